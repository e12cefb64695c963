"""The workspace as MCP resources: `workspace:///path` (resources/list, /read,
/templates/list), so clients that show resources can attach the agent's files.

The SDK's resource manager holds a fixed set of resources; a workspace is
per caller and changes with every command, so the three methods are served
by handlers of our own on the lowlevel server, with the caller found the same
way as for tools. Reads go through files.py like read_file (beneath the
root, no symlinks, regular files only, never blocking).

- `workspace:///src/main.py`: the caller's workspace;
- `workspace://ws_.../src/main.py`: a workspace made with create_workspace.

resources/list returns up to `files.max_list` regular files, depth first in
name order (no cursor). A read returns at most `files.max_read` bytes: a
larger file is an error pointing to read_file's paging. Contents are text
when the file is UTF-8 that needs no escaping, else a blob (base64): the
exact bytes either way, and never raw control characters as text.
"""

from __future__ import annotations

import base64
import mimetypes
import posixpath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    BlobResourceContents,
    ListResourcesResult,
    ListResourceTemplatesResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    TextResourceContents,
)

from .. import files
from ..errors import GvisorMcpError, InfrastructureError
from ..fileop import FileOp
from ..roots import Root
from ..text import render_bytes
from .context import RequestContext, TenantState
from .files import caller_roots, run_op

SCHEME = "workspace"
LIST_DEPTH = 16


def uri_for(parts: tuple[str, ...], handle: str = "") -> str:
    return f"{SCHEME}://{handle}/" + quote("/".join(parts), safe="/")


def _workspace_root(app: TenantState, ctx: RequestContext, handle: str | None) -> tuple[Any, Root | None]:
    try:
        _caller, settings, roots = caller_roots(app, ctx, handle, create=False)
    except (ToolError, GvisorMcpError) as e:
        raise _mcp_error(e) from None
    return settings, next((r for r in roots if r.kind == "workspace"), None)


def _mcp_error(e: Exception) -> MCPError:
    text = e.for_agent() if isinstance(e, InfrastructureError) else str(e)
    return MCPError(code=INVALID_PARAMS, message=text)


async def _op(app: TenantState, settings: Any, root: Root, op: FileOp) -> Any:
    """run_op without creating the workspace (None: it does not exist yet, cluster only)."""
    try:
        return await run_op(app, settings, root, op, create=False)
    except (ToolError, GvisorMcpError) as e:
        if isinstance(e, files.FileError):
            raise
        raise _mcp_error(e) from None


async def list_resources(ctx: RequestContext, params: PaginatedRequestParams) -> ListResourcesResult:
    app = ctx.lifespan_context
    settings, root = _workspace_root(app, ctx, None)
    if root is None:
        return ListResourcesResult(resources=[])
    limit = settings.files.max_list
    # Walk at most `limit` entries of any kind: bounded work, whatever the tree.
    got = await _op(app, settings, root, FileOp(kind="list", depth=LIST_DEPTH, limit=limit))
    if got is None:
        return ListResourcesResult(resources=[])
    entries, _ = got
    out = []
    for e in entries:
        if e.kind != "file" or files.is_temp_name(e.path[-1]):
            continue
        try:
            "/".join(e.path).encode("utf-8")
        except UnicodeEncodeError:
            continue  # not UTF-8: no URI can name it; read_file/list_files show it escaped
        out.append(
            Resource(
                uri=uri_for(e.path),
                name=render_bytes("/".join(e.path).encode()),
                mime_type=_mime(e.path[-1]),
                size=e.size,
                description=f"{posixpath.join(root.mount, *e.path)} in the workspace",
            )
        )
    return ListResourcesResult(resources=out)


async def list_templates(ctx: RequestContext, params: PaginatedRequestParams) -> ListResourceTemplatesResult:
    return ListResourceTemplatesResult(
        resource_templates=[
            ResourceTemplate(
                uri_template=f"{SCHEME}:///{{+path}}",
                name="workspace file",
                description="A file of your workspace, by its path relative to the workspace "
                "(read-only view; at most files.max_read bytes; read_file pages larger ones).",
            ),
        ]
    )


async def read_resource(ctx: RequestContext, params: ReadResourceRequestParams) -> ReadResourceResult:
    app = ctx.lifespan_context
    uri = str(params.uri)
    split = urlsplit(uri)
    if split.scheme != SCHEME:
        raise MCPError(code=INVALID_PARAMS, message=f"unknown resource {uri[:200]!r}: expected {SCHEME}:///PATH")
    settings, root = _workspace_root(app, ctx, split.netloc or None)
    if root is None:
        raise MCPError(code=INVALID_PARAMS, message="this call has no workspace to read from")
    try:
        parts = files.parse(unquote(split.path).lstrip("/"))
        # The file's size (fstat) says when it is larger than one read returns.
        got = await _op(app, settings, root, FileOp.at(parts, "read", length=settings.files.max_read))
    except files.FileError as e:
        raise MCPError(code=INVALID_PARAMS, message=str(e), data={"uri": uri}) from None
    if got is None:
        raise MCPError(code=INVALID_PARAMS, message="this call has no workspace to read from")
    if got.size > settings.files.max_read:
        raise MCPError(
            code=INVALID_PARAMS,
            message=f"{files.display(parts)} is {got.size} bytes, more than one read returns "
            f"(files.max_read = {settings.files.max_read}); page it with read_file(path, offset, length)",
            data={"uri": uri},
        )
    mime = _mime(parts[-1])
    try:
        text = got.data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and render_bytes(got.data) == text:
        return ReadResourceResult(contents=[TextResourceContents(uri=uri, text=text, mime_type=mime or "text/plain")])
    return ReadResourceResult(
        contents=[
            BlobResourceContents(
                uri=uri,
                blob=base64.b64encode(got.data).decode("ascii"),
                mime_type=mime or "application/octet-stream",
            )
        ]
    )


def _mime(name: str) -> str | None:
    return mimetypes.guess_type(name, strict=False)[0]


def register_resources(server: Any) -> None:
    """Serve resources/list, /read and /templates/list for the caller's workspace."""
    low = server._lowlevel_server
    low.add_request_handler("resources/list", PaginatedRequestParams, list_resources)
    low.add_request_handler("resources/templates/list", PaginatedRequestParams, list_templates)
    low.add_request_handler("resources/read", ReadResourceRequestParams, read_resource)
