"""inspect_result: a result's status plus a byte range of one captured stream."""

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from ..sandbox import ContainerStatus
from ..text import render_bytes
from .boundary import report_progress
from .context import ToolContext
from .models import InspectResult
from .render import MAX_PAGE
from .view import network_lines, receipt_lines, status_line

MAX_WAIT = 300.0

DESCRIPTION = """Read a command's result and page through its full captured output.

Returns a short status (status, exit code, duration, bytes written) and `data`: bytes
[offset, offset+length) of the chosen stream (default stdout), with `next_offset`
for the next page (null at the end) and `total_bytes` stored; the head/tail excerpts
execute_command showed are not repeated. receipt=true adds the full limits receipt
(every field: requested, granted, rule, ceiling) and the network report. encoding="text"
(default) is for reading: invalid UTF-8 and control bytes are shown as \\xNN, a
character split by a page edge too. encoding="base64" returns the exact bytes: pages
put together reproduce the captured stream byte for byte. With wait_seconds, waits up to that long for a running command to finish.
Results of other callers are never visible ("not found")."""


def make_inspect_tool() -> Callable[..., Awaitable[CallToolResult]]:
    async def inspect_result(
        result_id: Annotated[str, Field(description="From execute_command.")],
        ctx: ToolContext,
        stream: Annotated[Literal["stdout", "stderr"], Field(description="Which stream to page.")] = "stdout",
        offset: Annotated[int, Field(ge=0, description="First byte to return.")] = 0,
        length: Annotated[int, Field(gt=0, le=MAX_PAGE, description=f"How many bytes (max {MAX_PAGE}).")] = 65536,
        encoding: Annotated[
            Literal["text", "base64"],
            Field(description="text: safe to read; base64: the exact bytes."),
        ] = "text",
        wait_seconds: Annotated[
            float, Field(ge=0, le=MAX_WAIT, description="Wait up to this long for a running command.")
        ] = 0,
        receipt: Annotated[bool, Field(description="Add the full limits receipt and the network report.")] = False,
    ) -> Annotated[CallToolResult, InspectResult]:
        app = ctx.request_context.lifespan_context
        caller = app.caller(ctx)
        stored = app.store.get(result_id, caller.tenant)
        if stored is None:
            raise ToolError(_not_found(result_id))
        if (lost := app.jobs.unstored(result_id, caller.tenant)) is not None:
            raise ToolError(f"result_id {result_id}: {lost.store_error}")
        if wait_seconds and stored.status == ContainerStatus.RUNNING:
            job = app.jobs.get(result_id, caller.tenant)
            if job is not None:
                deadline = time.monotonic() + wait_seconds
                with anyio.move_on_after(wait_seconds):
                    while not job.done.is_set():
                        with anyio.move_on_after(1.0):
                            await job.done.wait()
                        if not job.done.is_set():
                            await report_progress(
                                ctx,
                                round(job.elapsed(), 1),
                                job.timeout or None,
                                f"still running; {max(0, deadline - time.monotonic()):.0f} s left to wait",
                            )
            stored = app.store.get(result_id, caller.tenant) or stored
        data, total = app.store.read(stored, stream, offset, length)
        end = offset + len(data)
        running = stored.status == ContainerStatus.RUNNING
        result = InspectResult(
            result_id=stored.result_id,
            status=stored.status,
            exit_code=stored.exit_code,
            signal=stored.signal,
            duration_ms=stored.duration_ms,
            oom_killed=stored.oom_killed,
            peak_memory_bytes=stored.peak_memory_bytes,
            stdout_bytes=0 if running else stored.stdout_bytes,
            stderr_bytes=0 if running else stored.stderr_bytes,
            error=stored.error,
            stream=stream,
            offset=offset,
            data=render_bytes(data) if encoding == "text" else base64.b64encode(data).decode("ascii"),
            encoding=encoding,
            data_bytes=len(data),
            next_offset=end if end < total or running else None,
            total_bytes=total,
            limits=stored.limits if receipt else None,
            network=stored.network if receipt else None,
        )
        lines = [status_line(result, result_id)]
        if receipt:
            lines += receipt_lines(stored.limits)
            if result.network is not None:
                lines += network_lines(result.network)
        elif stored.network and stored.network.denied:
            lines.append(f"network: {stored.network.denied} connections denied; receipt=true lists them")
        other = "stderr" if stream == "stdout" else "stdout"
        if not running and getattr(stored, f"{other}_bytes"):
            lines.append(f'{other}: {getattr(stored, f"{other}_bytes")} bytes (stream="{other}" reads them)')
        lines.append(
            f"--- {stream} bytes {offset} to {end} of {total}"
            + (f"; next page: offset={end}" if result.next_offset is not None else "; end")
            + f" ---\n{result.data}"
        )
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines))],
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
