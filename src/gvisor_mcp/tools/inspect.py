"""inspect_result: a result's status plus a byte range of one captured stream."""

import base64
import time
from typing import Annotated, Literal

import anyio
from .context import ToolContext
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from .boundary import report_progress
from .models import InspectResult
from .render import safe_text
from .view import exec_result, render_text

MAX_PAGE = 256 * 1024
MAX_WAIT = 300.0

DESCRIPTION = """Read a command's result and page through its full captured output.

Returns the status and result fields (as execute_command does) plus `data`: bytes
[offset, offset+length) of the chosen stream (default stdout), with `next_offset`
for the next page (null at the end) and `total_bytes` stored. encoding="text"
(default) is for reading: invalid UTF-8 and control bytes are shown as \\xNN, a
character split by a page edge too. encoding="base64" returns the exact bytes: pages
put together reproduce the captured stream byte for byte. With wait_seconds, waits up to that long for a running command to finish.
Results of other callers are never visible ("not found")."""


def make_inspect_tool(head: int, tail: int):  # type: ignore[no-untyped-def]
    async def inspect_result(
        result_id: Annotated[str, Field(description="From execute_command.")],
        ctx: ToolContext,
        stream: Annotated[Literal["stdout", "stderr"], Field(description="Which stream to page.")] = "stdout",
        offset: Annotated[int, Field(ge=0, description="First byte to return.")] = 0,
        length: Annotated[int, Field(gt=0, le=MAX_PAGE, description="How many bytes (max 262144).")] = 65536,
        encoding: Annotated[
            Literal["text", "base64"],
            Field(description="text: safe to read; base64: the exact bytes."),
        ] = "text",
        wait_seconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT, description="Wait up to this long for a running command.")
        ] = 0,
    ) -> Annotated[CallToolResult, InspectResult]:
        app = ctx.request_context.lifespan_context
        caller = app.caller(ctx)
        stored = app.store.get(result_id, caller.tenant)
        if stored is None:
            raise ToolError(_not_found(result_id))
        if (lost := app.jobs.unstored(result_id, caller.tenant)) is not None:
            raise ToolError(f"result_id {result_id}: {lost.store_error}")
        if wait_seconds and stored.status == "running":
            job = app.jobs.get(result_id, caller.tenant)
            if job is not None:
                deadline = time.monotonic() + wait_seconds
                with anyio.move_on_after(wait_seconds):
                    while not job.done.is_set():
                        with anyio.move_on_after(1.0):
                            await job.done.wait()
                        if not job.done.is_set():
                            await report_progress(
                                ctx, round(job.elapsed(), 1), job.timeout or None,
                                f"still running; {max(0, deadline - time.monotonic()):.0f} s left to wait",
                            )
            stored = app.store.get(result_id, caller.tenant) or stored
        base = exec_result(app, stored, head, tail)
        data, total = app.store.read(stored, stream, offset, length)
        end = offset + len(data)
        result = InspectResult(
            **base.model_dump(),
            stream=stream,
            offset=offset,
            data=safe_text(data) if encoding == "text" else base64.b64encode(data).decode("ascii"),
            encoding=encoding,
            data_bytes=len(data),
            next_offset=end if end < total or stored.status == "running" else None,
            total_bytes=total,
        )
        text = render_text(base, result_id) + (
            f"\n--- {stream} bytes {offset} to {end} of {total}"
            + (f"; next page: offset={end}" if result.next_offset is not None else "; end")
            + f" ---\n{result.data}"
        )
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content=result.model_dump(mode="json"),
        )

    inspect_result.__doc__ = DESCRIPTION
    return inspect_result


def _not_found(result_id: str) -> str:
    return (
        f"result_id {result_id[:80]!r} not found: it never existed, belongs to another "
        "caller, or was evicted. Use the result_id returned by execute_command; "
        "list_active shows commands still running."
    )
