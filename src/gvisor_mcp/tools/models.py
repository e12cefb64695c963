"""Structured outputs of the tools (published as their outputSchema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["exited", "timed_out", "oom_killed", "killed", "error", "running"]


class ExecResult(BaseModel):
    """The outcome of one command (or its state so far, when status is running)."""

    result_id: str = Field(description="Pass to inspect_result / cancel_command.")
    container_id: str | None = None
    status: Status
    exit_code: int | None = Field(None, description="null while running or when it never ran")
    signal: int | None = Field(None, description="signal number when the command died of one")
    stdout: str = Field("", description="head and tail of stdout, as shown to the model")
    stderr: str = Field("", description="head and tail of stderr, as shown to the model")
    stdout_truncated: bool = Field(False, description="true when `stdout` above is not the whole output")
    stderr_truncated: bool = False
    stdout_bytes: int = Field(0, description="bytes the command wrote to stdout (all of them)")
    stderr_bytes: int = 0
    duration_ms: int | None = None
    boot_ms: int | None = Field(None, description="time until the sandbox was running the command")
    warm: bool = Field(False, description="ran in a pre-booted sandbox (boot_ms is then the claim time)")
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    limits: dict[str, Any] | None = Field(None, description="what was requested, granted, and why")
    error: str | None = None


class InspectResult(ExecResult):
    stream: Literal["stdout", "stderr"]
    offset: int
    encoding: Literal["text", "base64"]
    data: str = Field(
        description="the requested bytes: text rendered safely (invalid UTF-8 and control bytes as \\xNN), or base64"
    )
    data_bytes: int = Field(description="how many stored bytes `data` covers")
    next_offset: int | None = Field(description="offset of the next page, null at the end")
    total_bytes: int = Field(description="bytes stored for this stream so far")


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
