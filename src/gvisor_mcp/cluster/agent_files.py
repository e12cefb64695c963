"""The file tools on an agent's host: the request a front end sends, and how
the agent checks and serves it.

With `--backend ray` a workspace lives on one host (its home, kept by the
coordinator), so read_file, write_file, list_files, delete_file and the
`workspace:///` resources are done by that host's agent. A `FileRequest`
names the workspace as a `WorkspaceRef` (directory names, never a path) and
carries one `fileop.FileOp`; the agent checks everything again, as it does
run specs, because anyone holding the cluster token can call it:

- the workspace must be a directory of the named tenant (spec.check_workspace:
  tenant and session are single directory names, the size within this
  host's ceiling);
- the path is parsed by files.parse (relative, no `..`, no NUL, bounded);
- read / write / list sizes are within this host's `HostCeilings`
  (file_read_bytes, file_write_bytes, file_list_entries).

Then it runs `fileop.apply` beneath the workspace's mount point, the very
function the single-host server runs: openat2 RESOLVE_BENEATH, no symlinks,
regular files only, atomic writes owned by the sandbox user.

A refused request raises SpecRefused (nothing touched); a FileError of the
operation itself (missing file, a symlink, a full workspace) is an answer,
`{"error": [kind, text]}`, which the front end turns back into the same
FileError the local tools raise (exceptions with their own constructor do
not survive Ray's pickling, and the text is the contract).

Pure of Ray: the agent's methods (agent.py) call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, ValidationError

from .. import files
from .. import workspace as _workspace
from ..fileop import FileOp, apply_at
from ..sandbox import UserSpec
from .spec import HostCeilings, SpecRefused, WorkspaceRef, check_workspace, parse_as


class FileRequest(BaseModel):
    """One file operation on one workspace of an agent's host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    workspace: WorkspaceRef
    owner: UserSpec
    """Who a new workspace image's root and new files belong to (the sandbox user)."""
    op: FileOp | None = None
    """None: only make sure the workspace exists (create_workspace)."""
    create: bool = True
    """False: a workspace that does not exist yet is not made; the answer says absent."""


def parse_request(data: object) -> FileRequest:
    return parse_as(FileRequest, data, "file request", "a file request carries tenant, workspace, owner, op, create")


def check_request(req: FileRequest, ceilings: HostCeilings) -> None:
    """SpecRefused naming what is wrong; nothing has been touched."""
    check_workspace(req.workspace, req.tenant, ceilings, "file request")
    op = req.op
    if op is None:
        return
    try:
        files.parse(op.path)
    except files.FileError as e:
        raise SpecRefused(f"file request refused: path: {e}") from None
    over = None
    if op.kind == "read" and op.length > ceilings.file_read_bytes:
        over = f"read length={op.length} is above this host's ceiling of {ceilings.file_read_bytes} bytes"
    elif op.kind == "write" and len(op.data or b"") > ceilings.file_write_bytes:
        over = f"write of {len(op.data or b'')} bytes is above this host's ceiling of {ceilings.file_write_bytes}"
    elif op.kind == "list" and op.limit > ceilings.file_list_entries:
        over = f"list limit={op.limit} is above this host's ceiling of {ceilings.file_list_entries} entries"
    if over:
        raise SpecRefused(f"file request refused: {over}")


def workspace_dir(ws: WorkspaceRef, root: Path) -> Path:
    """The workspace's mount point on this host, beneath `root` (checked: the
    names were validated, this is the second lock)."""
    root = root.resolve()
    path = ws.host_path(root).resolve()
    if root not in path.parents:
        raise SpecRefused(f"workspace {ws.key[:120]!r} is not beneath this host's workspace root")
    return path


def exists(ws: WorkspaceRef, root: Path) -> bool:
    """Whether this host holds the workspace's image (made by a run or a file tool)."""
    path = workspace_dir(ws, root)
    return _workspace.image_path(root.resolve(), path).exists()


def checked_ref(data: object, ceilings: HostCeilings) -> WorkspaceRef:
    """A WorkspaceRef from a front end (release, exists), validated like a request's."""
    try:
        ws = WorkspaceRef.model_validate(data)
    except ValidationError as e:
        raise SpecRefused(f"workspace reference refused: {e.errors(include_url=False)[0]['msg']}") from None
    check_workspace(ws, ws.tenant, ceilings, "workspace reference")
    return ws


async def serve(agent: Any, data: object) -> dict[str, Any]:
    """Check and do one FileRequest on `agent`'s host (a HostAgent):
    {"ok": result} | {"error": [kind, text]} | {"absent": True}."""
    req = parse_request(data)
    check_request(req, agent.config.ceilings)
    agent._require()
    root = agent.config.workspace_root
    path = workspace_dir(req.workspace, root)
    if not req.create and not exists(req.workspace, root):
        return {"absent": True}
    await agent._ensure_workspace(req.workspace, req.owner)
    if req.op is None:
        return {"ok": None}
    try:
        result = await anyio.to_thread.run_sync(apply_at, str(path), req.op)
    except files.FileError as e:
        return {"error": [e.kind, str(e)]}
    return {"ok": result}
