"""One file tool operation as data, and the one function that carries it out.

The file tools (tools/files.py, tools/resources.py) describe what they want
as a `FileOp` and `apply` does it beneath a root fd with files.py's rules
(openat2 beneath the root, no symlinks, regular files only, atomic writes as
the sandbox user). The single-host server applies it here; with
`--backend ray` the op crosses to the HostAgent that holds the workspace
(cluster/agent_files.py), which validates it again and applies it with this
same function: one code path, one set of safety rules, wherever the
workspace lives.

No MCP and no policy: the caller decides the bounds (the policy's
files.max_read / max_write / max_list; an agent's own ceilings).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import files

MAX_DEPTH = 16


class FileOp(BaseModel):
    """read | write | list | delete of `path` (relative to the root, as files.parse takes it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["read", "write", "list", "delete"]
    path: str = "."
    offset: int = Field(default=0, ge=0)
    length: int = Field(default=0, ge=0)
    """read: how many bytes at most."""
    data: bytes | None = None
    """write: the whole new content."""
    mode: int | None = Field(default=None, ge=0, le=0o777)
    uid: int = Field(default=0, ge=0, le=2**31 - 2)
    gid: int = Field(default=0, ge=0, le=2**31 - 2)
    """write: the owner of what it creates (the sandbox user)."""
    depth: int = Field(default=1, ge=1, le=MAX_DEPTH)
    limit: int = Field(default=1, ge=1)
    """list: at most this many entries."""
    recursive: bool = False

    @classmethod
    def at(cls, parts: tuple[str, ...], kind: str, **fields: Any) -> FileOp:
        return cls(kind=kind, path=files.display(parts), **fields)

    @property
    def parts(self) -> tuple[str, ...]:
        """The path's components; FileError ("invalid") for absolute paths, `..`, NUL."""
        return files.parse(self.path)


def apply(rootfd: int, op: FileOp) -> Any:
    """Do `op` beneath `rootfd`: files.ReadResult, files.WriteResult,
    (entries, truncated) or the kind deleted. FileError when refused."""
    parts = op.parts
    if op.kind == "read":
        return files.read(rootfd, parts, op.offset, op.length)
    if op.kind == "write":
        return files.write(rootfd, parts, op.data or b"", uid=op.uid, gid=op.gid, mode=op.mode)
    if op.kind == "list":
        return files.listing(rootfd, parts, op.depth, op.limit)
    return files.delete(rootfd, parts, recursive=op.recursive)


def apply_at(root: str, op: FileOp) -> Any:
    """`apply` beneath the directory `root` (its last component is not followed either)."""
    with files.root(root) as fd:
        return apply(fd, op)
