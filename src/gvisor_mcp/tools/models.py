"""Structured outputs of the tools (published as their outputSchema).

Class docstrings and field descriptions are published: they are written for
the model. A run's fields come from the run record (results/record.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..results.record import NetworkReport, RunRecord, RunStatus


class ExecResult(RunRecord):
    """The outcome of one command (or its state so far, when status is running)."""

    # The record's fields, plus the excerpts; here `stdout_truncated` says
    # whether the excerpt is not the whole output (the store's: the capture).
    stdout: str = Field("", description="head and tail of stdout, as shown to the model")
    stderr: str = Field("", description="head and tail of stderr, as shown to the model")
    stdout_truncated: bool = Field(False, description="true when `stdout` above is not the whole output")
    limits: dict[str, Any] | None = Field(
        None,
        description="the limits receipt, compact: policy_sha256, the entries this call requested "
        "(granted as asked, or clamped) and notes; every field, granted and why: "
        "inspect_result(result_id, receipt=true)",
    )


class InspectResult(BaseModel):
    """One page of a stream and the run's status: the head/tail excerpts are not sent again."""

    result_id: str
    status: RunStatus
    exit_code: int | None = Field(None, description="null while running or when it never ran")
    signal: int | None = None
    duration_ms: int | None = None
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    stdout_bytes: int = Field(0, description="bytes the command wrote to stdout (0 while running)")
    stderr_bytes: int = 0
    error: str | None = None
    stream: Literal["stdout", "stderr"]
    offset: int
    encoding: Literal["text", "base64"]
    data: str = Field(
        description="the requested bytes: text rendered safely (invalid UTF-8 and control bytes as \\xNN), or base64"
    )
    data_bytes: int = Field(description="how many stored bytes `data` covers")
    next_offset: int | None = Field(description="offset of the next page, null at the end")
    total_bytes: int = Field(description="bytes stored for this stream so far")
    limits: dict[str, Any] | None = Field(
        None, description="receipt=true: the full limits receipt (every field: requested, granted, rule, ceiling)"
    )
    network: NetworkReport | None = Field(None, description="receipt=true and network=sandbox: egress per destination")


class ActiveCommand(BaseModel):
    result_id: str
    container_id: str
    command: str
    started_at: str
    elapsed_ms: int
    limits: dict[str, Any] | None = None


class ActiveList(BaseModel):
    commands: list[ActiveCommand]
    capacity_in_use: int = Field(description="sandboxes running on this server, all callers")
    capacity_max: int


class FileRead(BaseModel):
    path: str = Field(description="the file, as commands in the sandbox see it")
    offset: int
    encoding: Literal["text", "base64"]
    data: str = Field(
        description="the requested bytes: text rendered safely (invalid UTF-8 and control bytes as \\xNN), or base64"
    )
    escaped: bool = Field(description="true when `data` (text) is not byte-exact: read with encoding=base64 to edit")
    data_bytes: int = Field(description="how many bytes of the file `data` covers")
    next_offset: int | None = Field(description="offset of the next page, null at the end")
    total_bytes: int = Field(description="the file's size")
    mtime: str = Field(description="last modification, UTC ISO 8601")


class FileWritten(BaseModel):
    path: str
    bytes: int = Field(description="bytes written (the whole file)")
    created: bool = Field(description="false when an existing file was replaced")
    mode: str = Field(description="permission bits, octal")


class FileEntry(BaseModel):
    path: str = Field(description="as commands in the sandbox see it")
    type: Literal["file", "directory", "symlink", "fifo", "socket", "char-device", "block-device", "other"]
    size: int
    mtime: str
    mode: str
    target: str | None = Field(None, description="a symlink's target (never followed)")


class FileList(BaseModel):
    path: str
    entries: list[FileEntry]
    truncated: bool = Field(description="true when more entries exist than were returned (files.max_list)")


class FileDeleted(BaseModel):
    path: str
    removed: str = Field(description="what was removed: file, directory, symlink, fifo, ...")


class WorkspaceCreated(BaseModel):
    workspace: str = Field(description="pass as `workspace` to execute_command and the file tools")
    mount: str = Field(description="where commands see it")
    size: str
    idle_minutes: float = Field(description="it is deleted after this long unused, and when the server stops")
