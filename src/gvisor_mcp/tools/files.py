"""write_file, read_file, list_files, delete_file: the server works on the
workspace and the operator's projects itself, without booting a sandbox.

No `from __future__ import annotations`: the SDK reads these signatures as
objects (the policy's bounds are published in them, see execute.py).

Every path goes through roots.locate (workspace or project, never anything
else) and files.py (openat2 beneath the root, no symlinks, regular files
only, atomic writes). The policy's `files.max_read` / `max_write` /
`max_list` bound each call; the workspace image bounds the total.

Why over ~400 lines: the four file tools share the path location, the
policy's bounds in their signatures and one way of answering a file error;
split per tool, those would be repeated four times.
"""

import base64
import binascii
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from .. import files
from ..errors import Refusal
from ..fileop import FileOp, apply_at
from ..policy import plan_workspace, project_mounts
from ..policy.resolve import NO_SESSION_NOTE
from ..policy.units import format_bytes
from ..roots import Root, locate, sandbox_path
from ..sandbox.options import UserSpec
from ..text import render_bytes
from ..workspace import image_path
from .context import RequestContext, TenantState, ToolContext
from .models import FileDeleted, FileEntry, FileList, FileRead, FileWritten

DEFAULT_PAGE = 64 * 1024
MAX_DEPTH = 16


@dataclass(frozen=True)
class FileFacts:
    """What the caller's policy lets the file tools do, as the schemas publish it."""

    max_read: int
    max_write: int
    max_list: int
    workspace: str | None
    workspace_size: int
    projects: tuple[tuple[str, str, bool], ...]
    """(name, mount point, read_only)"""
    agent_workspaces: bool
    """HTTP with scope session: calls may name a workspace from create_workspace."""

    @property
    def reach(self) -> str:
        parts = []
        if self.workspace:
            parts.append(f"the workspace ({self.workspace}, {format_bytes(self.workspace_size)})")
        parts += [f"project {n!r} ({m}, {'read-only' if ro else 'read-write'})" for n, m, ro in self.projects]
        return ", ".join(parts) or "nothing under this policy (no workspace, no project)"


def file_facts(settings: Any, extra_projects: dict[str, Any] | None, agent_workspaces: bool) -> FileFacts:
    ws = settings.workspace
    return FileFacts(
        max_read=settings.files.max_read,
        max_write=settings.files.max_write,
        max_list=settings.files.max_list,
        workspace=ws.mount if ws.enabled else None,
        workspace_size=ws.size * 1024 * 1024,
        projects=tuple(
            (name, p.mount_point(name), p.read_only)
            for name, p in sorted(project_mounts(settings, extra_projects).items())
        ),
        agent_workspaces=agent_workspaces,
    )


# --- where a call's paths lead ---------------------------------------------------------


def caller_roots(
    app: TenantState, ctx: ToolContext | RequestContext, workspace: str | None, *, create: bool = True
) -> tuple[Any, Any, list[Root]]:
    """(caller, settings, roots) for this call: its workspace (mounted; created if
    `create`) and the projects."""
    caller = app.caller(ctx, workspace)  # NoSuchWorkspace: a refusal (tools/refuse.py)
    settings = app.policy.current.tenant(caller.tenant)
    args = app.resolve_args(caller)
    plan = plan_workspace(settings, caller.tenant, args["workspace_root"], args["session_id"], args["workspace_name"])
    roots: list[Root] = []
    if plan is not None and app.remote_workspaces is not None:
        # --backend ray: the workspace lives on an agent's host; run_op goes there.
        roots.append(Root("workspace", plan.mount, plan.host_path.resolve(), False, "workspace"))
    elif plan is not None and (create or image_path(app.workspace_root.resolve(), plan.host_path.resolve()).exists()):
        user = UserSpec.parse(settings.defaults.user)
        host = app.prepare_plan(plan, (user.uid, user.gid))
        roots.append(Root("workspace", plan.mount, host, False, "workspace"))
    for name, project in sorted(project_mounts(settings, args["extra_projects"]).items()):
        # The operator's own path may go through symlinks (runsc's bind follows
        # them too); only what lies beneath it is never followed.
        roots.append(
            Root(name, project.mount_point(name), Path(os.path.realpath(project.path)), project.read_only, "project")
        )
    return caller, settings, roots


def _no_workspace_hint(settings: Any) -> str:
    if not settings.workspace.enabled:
        return "this policy mounts no workspace (workspace.enabled: false); use an absolute path under a project"
    return NO_SESSION_NOTE


def _locate(settings: Any, roots: list[Root], path: str) -> tuple[Root, tuple[str, ...]]:
    try:
        return locate(roots, path, _no_workspace_hint(settings))
    except files.FileError as e:
        raise ToolError(str(e)) from None


def _fail(e: files.FileError, root: Root, settings: Any, doing: str) -> ToolError:
    """A FileError with what the agent needs to act on it."""
    text = str(e)
    if e.kind == "no_space" and root.kind == "workspace":
        text = (
            f"the workspace is full: it holds at most {format_bytes(settings.workspace.size * 1024 * 1024)} "
            f"(workspace.size, set by the operator). Nothing was written. Delete files you no longer need "
            "(delete_file, or a command) and try again"
        )
    elif e.kind == "no_space":
        text += f"; the project {root.name!r} has no room left on its host filesystem. Nothing was written"
    return ToolError(text)


async def run_op(app: TenantState, settings: Any, root: Root, op: FileOp, *, create: bool = True) -> Any:
    """`op` on `root`: here, or with `--backend ray` on the agent holding the
    workspace (the same fileop.apply there). None when `create` is false and
    the workspace does not exist yet (cluster only). FileError when refused."""
    remote = app.remote_workspaces
    if remote is not None:
        if root.kind != "workspace":
            raise ToolError(
                f"project {root.name!r} ({root.mount}) is a directory of the front end's host, and with "
                "--backend ray commands run on the cluster's agents, which cannot mount it: projects are "
                "not served by a cluster front end. Use the workspace"
            )
        if create:
            app.made_workspaces.add(root.host)  # removed with its session (drop_session)
        return await remote.file_op(app.tenant, root.host, _size_mb(settings), _owner(settings), op, create=create)
    return apply_at(str(root.host), op)


def _size_mb(settings: Any) -> int:
    return int(settings.workspace.size)


async def on_path(
    app: TenantState,
    ctx: ToolContext,
    workspace: str | None,
    path: str,
    doing: str,
    make: Any,
    *,
    writable: bool = False,
) -> tuple[Any, Root, tuple[str, ...], Any]:
    """Find `path` for this caller and run the FileOp `make(parts, settings)` on it;
    (caller, root, parts, its result), or a ToolError the agent can act on."""
    caller, settings, roots = caller_roots(app, ctx, workspace)
    root, parts = _locate(settings, roots, path)
    if writable and root.read_only:
        raise ToolError(
            f"project {root.name!r} ({root.mount}) is mounted read-only by the operator's policy; "
            f"nothing was {doing}. Use the workspace instead"
        )
    try:
        return caller, root, parts, await run_op(app, settings, root, make(parts, settings))
    except files.FileError as e:
        raise _fail(e, root, settings, doing) from None


def _owner(settings: Any) -> tuple[int, int]:
    user = UserSpec.parse(settings.defaults.user)
    return user.uid, user.gid


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _show(text: str) -> str:
    """A name from the tree (anything a command wrote) as inert text."""
    return render_bytes(text.encode("utf-8", "surrogateescape"))


def _result(text: str, model: Any) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=model.model_dump(mode="json")
    )


def workspace_param(fn: Any, offered: bool, name: str = "workspace") -> Any:
    """Publish the `workspace` parameter only where it means something (HTTP,
    scope session); elsewhere the signature the SDK reads leaves it out."""
    if not offered:
        sig = inspect.signature(fn)
        fn.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != name])
    return fn


WorkspaceArg = Annotated[
    str | None,
    Field(description="An id from create_workspace: work in that workspace (default: this session's)."),
]
PathArg = Annotated[
    str,
    Field(description="Relative to the workspace, or absolute under its mount point or a project's."),
]


# --- the tools -----------------------------------------------------------------------------


def make_file_tools(facts: FileFacts) -> list[Any]:
    async def read_file(
        path: PathArg,
        ctx: ToolContext,
        offset: Annotated[int, Field(ge=0, description="First byte to return.")] = 0,
        length: Annotated[
            int,
            Field(
                gt=0,
                le=facts.max_read,
                description=f"How many bytes (default {DEFAULT_PAGE}, at most {facts.max_read}: files.max_read).",
            ),
        ] = min(DEFAULT_PAGE, facts.max_read),
        encoding: Annotated[
            Literal["text", "base64"], Field(description="text: safe to read; base64: the exact bytes.")
        ] = "text",
        workspace: WorkspaceArg = None,
    ) -> Annotated[CallToolResult, FileRead]:
        app = ctx.request_context.lifespan_context
        _, root, parts, got = await on_path(
            app,
            ctx,
            workspace,
            path,
            "read",
            lambda parts, _s: FileOp.at(parts, "read", offset=offset, length=length),
        )
        end = offset + len(got.data)
        if encoding == "text":
            data = render_bytes(got.data)
            escaped = data.encode("utf-8", "surrogatepass") != got.data
        else:
            data, escaped = base64.b64encode(got.data).decode("ascii"), False
        shown = sandbox_path(root, parts)
        result = FileRead(
            path=shown,
            offset=offset,
            encoding=encoding,
            data=data,
            escaped=escaped,
            data_bytes=len(got.data),
            next_offset=end if end < got.size else None,
            total_bytes=got.size,
            mtime=_iso(got.mtime),
        )
        head = (
            f"{_show(shown)}: bytes {offset} to {end} of {got.size}"
            + (f"; next page: offset={end}" if result.next_offset is not None else "; end")
            + (" (text shown with \\xNN escapes: read with encoding=base64 for the exact bytes)" if escaped else "")
        )
        return _result(f"{head}\n{data}", result)

    read_file.__doc__ = f"""Read a file of the workspace or a project, without starting a sandbox.

Returns bytes [offset, offset+length) with `next_offset` for the next page (null at the
end) and `total_bytes`. encoding="text" (default) is for reading: invalid UTF-8 and
control bytes are shown as \\xNN (then `escaped` is true); encoding="base64" returns the
exact bytes. At most {facts.max_read} bytes per call (files.max_read). Reaches: {facts.reach}.
Only regular files; symbolic links are never followed."""

    async def write_file(
        path: PathArg,
        content: Annotated[
            str,
            Field(
                description=f"The whole new content; at most {facts.max_write} bytes after decoding (files.max_write).",
                json_schema_extra={"maxLength": -(-facts.max_write // 3) * 4},
            ),
        ],
        ctx: ToolContext,
        encoding: Annotated[
            Literal["text", "base64"], Field(description="text: UTF-8 as given; base64: binary data.")
        ] = "text",
        mode: Annotated[
            str | None,
            Field(
                json_schema_extra={"pattern": r"^(0o?)?[0-7]{3,4}$"},
                description='Permission bits, octal like "644" or "0755" (default: an existing file\'s, else 644).',
            ),
        ] = None,
        workspace: WorkspaceArg = None,
    ) -> Annotated[CallToolResult, FileWritten]:
        app = ctx.request_context.lifespan_context
        data = _decode(content, encoding, facts.max_write)
        try:
            perm = files.parse_mode(mode)
        except files.FileError as e:
            raise ToolError(str(e)) from None

        def write(parts: tuple[str, ...], settings: Any) -> FileOp:
            uid, gid = _owner(settings)
            return FileOp.at(parts, "write", data=data, uid=uid, gid=gid, mode=perm)

        caller, root, parts, done = await on_path(app, ctx, workspace, path, "written", write, writable=True)
        shown = sandbox_path(root, parts)
        app.audit.write(
            tenant=caller.tenant,
            session=caller.session_id,
            tool="write_file",
            path=shown,
            bytes=done.size,
            decision="allowed",
            policy_hash=app.policy.current.sha256,
        )
        result = FileWritten(path=shown, bytes=done.size, created=done.created, mode=f"{done.mode:04o}")
        return _result(
            f"wrote {done.size} bytes to {_show(shown)} ({'new file' if done.created else 'replaced'}, mode {done.mode:04o})",
            result,
        )

    write_file.__doc__ = f"""Write a whole file in the workspace or a read-write project, without starting a sandbox.

Creates missing parent directories. Atomic: the file is written under a temporary name
and renamed, so a reader never sees half of it, and a failed write (too large, workspace
full, bad base64) leaves everything as it was. New files belong to the sandbox user, so
commands can change them. encoding="base64" for binary data. At most {facts.max_write}
bytes (files.max_write). Reaches: {facts.reach}. Refuses symlinks, directories and other
non-regular files at the path."""

    async def list_files(
        ctx: ToolContext,
        path: Annotated[str, Field(description="A directory: relative to the workspace, or absolute.")] = ".",
        depth: Annotated[
            int, Field(ge=1, le=MAX_DEPTH, description="1: the directory's entries; 2: and theirs; ...")
        ] = 1,
        workspace: WorkspaceArg = None,
    ) -> Annotated[CallToolResult, FileList]:
        app = ctx.request_context.lifespan_context
        _, root, parts, (entries, truncated) = await on_path(
            app,
            ctx,
            workspace,
            path,
            "listed",
            lambda parts, _s: FileOp.at(parts, "list", depth=depth, limit=facts.max_list),
        )
        out = [
            FileEntry(
                path=_show(sandbox_path(root, e.path)),
                type=e.kind,
                size=e.size,
                mtime=_iso(e.mtime),
                mode=f"{e.mode:04o}",
                target=_show(e.target) if e.target is not None else None,
            )
            for e in entries
            if not (e.kind == "file" and files.is_temp_name(e.path[-1]))
        ]
        shown = sandbox_path(root, parts)
        result = FileList(path=_show(shown), entries=out, truncated=truncated)
        lines = [
            f"{len(out)} entries under {_show(shown)}"
            + (
                f" (stopped at files.max_list={facts.max_list}: list a subdirectory or a smaller depth)"
                if truncated
                else ""
            )
        ]
        for e in out:
            mark = {"directory": "/", "symlink": "@", "fifo": "|", "socket": "="}.get(e.type, "")
            lines.append(f"{e.mode} {e.size:>10} {e.mtime} {e.path}{mark}" + (f" -> {e.target}" if e.target else ""))
        return _result("\n".join(lines), result)

    list_files.__doc__ = f"""List a directory of the workspace or a project, without starting a sandbox.

Each entry has its path, type (file, directory, symlink, fifo, ...), size, mtime and
mode; symlinks show their target and are never followed. `depth` descends into
subdirectories. At most {facts.max_list} entries per call (files.max_list); `truncated`
says when there were more. Reaches: {facts.reach}."""

    async def delete_file(
        path: PathArg,
        ctx: ToolContext,
        recursive: Annotated[bool, Field(description="Delete a directory with everything in it.")] = False,
        workspace: WorkspaceArg = None,
    ) -> Annotated[CallToolResult, FileDeleted]:
        app = ctx.request_context.lifespan_context
        caller, root, parts, kind = await on_path(
            app,
            ctx,
            workspace,
            path,
            "deleted",
            lambda parts, _s: FileOp.at(parts, "delete", recursive=recursive),
            writable=True,
        )
        shown = sandbox_path(root, parts)
        app.audit.write(
            tenant=caller.tenant,
            session=caller.session_id,
            tool="delete_file",
            path=shown,
            decision="allowed",
            policy_hash=app.policy.current.sha256,
        )
        return _result(f"deleted {kind} {_show(shown)}", FileDeleted(path=shown, removed=kind))

    delete_file.__doc__ = f"""Delete a file, symlink (the link, never its target) or directory of the
workspace or a read-write project, without starting a sandbox. A directory that is not
empty needs recursive=true. Reaches: {facts.reach}."""

    return [workspace_param(fn, facts.agent_workspaces) for fn in (read_file, write_file, list_files, delete_file)]


class WriteTooLarge(Refusal):
    """write_file content over the policy's files.max_write (a ceiling)."""


def _decode(content: str, encoding: str, limit: int) -> bytes:
    """The bytes to write, or a ToolError naming the limit; checked before decoding."""
    over = (
        f"content is larger than the policy allows: at most {limit} bytes ({format_bytes(limit)}, "
        "files.max_write) per write_file; nothing was written. Write a smaller file, or produce large "
        "files with a command"
    )
    if encoding == "base64":
        if len(content) > -(-limit // 3) * 4 + 4:
            raise WriteTooLarge(over)
        try:
            data = base64.b64decode(content.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError) as e:
            raise ToolError(
                f"content is not valid base64 ({e}); nothing was written. Send standard base64 "
                "(A-Z a-z 0-9 + /, '=' padding, no line breaks), or encoding=\"text\" for text"
            ) from None
    else:
        if len(content) > limit:
            raise WriteTooLarge(over)
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolError(
                "content is not valid Unicode text (it holds a lone surrogate); nothing was written. "
                'Send binary data with encoding="base64"'
            ) from None
    if len(data) > limit:
        raise WriteTooLarge(over.replace("content is", f"content is {len(data)} bytes:", 1))
    return data
