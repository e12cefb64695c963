"""list_active and cancel_command: the caller's own commands in flight."""

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated

from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import Field

from .context import ToolContext
from .inspect import _not_found
from .models import ActiveCommand, ActiveList, ExecResult
from .view import compact_receipt, exec_result, render_text


async def list_active(ctx: ToolContext) -> Annotated[CallToolResult, ActiveList]:
    """List YOUR commands that are still running (background, or past the foreground
    limit): result_id, command, start time, elapsed time and the limits it asked for, plus how
    many sandboxes this server runs in all and its maximum."""
    app = ctx.request_context.lifespan_context
    caller = app.caller(ctx)
    jobs = sorted(app.jobs.active(caller.tenant), key=lambda j: j.started_at)
    listing = ActiveList(
        commands=[
            ActiveCommand(
                result_id=j.result_id,
                container_id=app.jobs.container_of(j) or "",
                command=j.command,
                started_at=dt.datetime.fromtimestamp(j.started_at, dt.UTC).isoformat(),
                elapsed_ms=round(j.elapsed() * 1000),
                limits=compact_receipt(j.limits),
            )
            for j in jobs
        ],
        capacity_in_use=app.jobs.runner.active_containers(),
        capacity_max=app.jobs.runner.capacity(),
    )
    lines = [f"{len(jobs)} running; server capacity {listing.capacity_in_use}/{listing.capacity_max}"]
    lines += [f"{c.result_id}  {c.elapsed_ms / 1000:.1f}s  {c.command[:120]}" for c in listing.commands]
    return CallToolResult(
        content=[TextContent(type="text", text="\n".join(lines))],
        structured_content=listing.model_dump(mode="json"),
    )


def make_cancel_tool(head: int, tail: int) -> Callable[..., Awaitable[CallToolResult]]:
    async def cancel_command(
        result_id: Annotated[str, Field(description="From execute_command or list_active.")],
        ctx: ToolContext,
    ) -> Annotated[CallToolResult, ExecResult]:
        """Kill one of YOUR running commands and return its final result (status killed).
        A command that already finished is returned as it ended."""
        app = ctx.request_context.lifespan_context
        caller = app.caller(ctx)
        stored = app.store.get(result_id, caller.tenant)
        if stored is None:
            raise ToolError(_not_found(result_id))
        job = app.jobs.get(result_id, caller.tenant)
        if job is not None:
            await app.jobs.cancel(job)
            stored = app.store.get(result_id, caller.tenant) or stored
        result = exec_result(app, stored, head, tail)
        return CallToolResult(
            content=[TextContent(type="text", text=render_text(result, result_id))],
            structured_content=result.model_dump(mode="json"),
        )

    return cancel_command
