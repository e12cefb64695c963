"""Where text crosses to the client: every tool result, error and progress message.

`SafeServer` is the MCPServer this project serves. It does two things for
every tool registered on it, so a new tool gets them without asking:

- arguments are validated in pydantic's strict mode (`background: "yes"` or
  `memory_mb: "512"` is refused, not coerced), with an error that names the
  argument, what was sent, what is allowed and how to ask again;
- whatever the call returns or raises passes through `text.render()`: every
  text content, every string in the structured content, every error text;
- argument errors and the package's own errors (gvisor_mcp.errors) go to
  refuse.answer(), the one place that words, audits and counts them.

Progress messages do not pass through a tool's return value: tools send
them with `report_progress()` below, never with `ctx.report_progress`
directly (tests/unit/test_text.py checks the source for that).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import GvisorMcpError
from ..runtime import TenantState
from ..text import render, render_value
from .context import ToolContext
from .metadata import drop_unserved, server_options
from .refuse import ArgumentRefused, answer, argument_error

M = TypeVar("M", bound=BaseModel)


def render_call_result(result: Any) -> Any:
    """A CallToolResult with its text contents and structured content rendered."""
    if not isinstance(result, CallToolResult):
        return result
    content = [
        TextContent(type="text", text=render(c.text), annotations=c.annotations, meta=c.meta)
        if isinstance(c, TextContent)
        else c
        for c in result.content
    ]
    structured = render_value(result.structured_content) if result.structured_content is not None else None
    return result.model_copy(update={"content": content, "structured_content": structured})


async def report_progress(ctx: ToolContext, progress: float, total: float | None, message: str) -> None:
    """The only way tools send progress: the message is rendered first."""
    await ctx.report_progress(progress=progress, total=total, message=render(message))


def _strict(model: type[M]) -> type[M]:
    """The SDK's argument model of a tool, in strict mode (same fields, same schema)."""
    return cast(
        "type[M]",
        type(model.__name__, (model,), {"model_config": ConfigDict(**{**model.model_config, "strict": True})}),
    )


class SafeServer(MCPServer[TenantState]):
    """MCPServer with strict arguments and rendered results for every tool, and
    only the capabilities this server implements (tools/metadata.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **server_options(kwargs))
        drop_unserved(self._lowlevel_server)

    def add_tool(self, fn: Any, name: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().add_tool(fn, name, *args, **kwargs)
        # The SDK builds the argument model from the signature; swap in its strict
        # twin. (Private attribute of the SDK: tests/protocol pin the behaviour.)
        tool = self._tool_manager.get_tool(name or fn.__name__)
        assert tool is not None
        tool.fn_metadata.arg_model = _strict(tool.fn_metadata.arg_model)

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        try:
            result = await super().call_tool(name, arguments, context)
        except UnexpectedToolError as e:
            if isinstance(e.__cause__, GvisorMcpError):  # refused or failed on purpose
                raise answer(e.__cause__, render(name), arguments, context) from e.__cause__
            # A crash: the SDK's generic text (rendered anyway); the log has the traceback.
            raise UnexpectedToolError(render(str(e))) from e.__cause__
        except ToolError as e:
            if isinstance(e.__cause__, ValidationError):  # the arguments failed the tool's schema
                refused = ArgumentRefused(render(name), e.__cause__)
                raise answer(refused, render(name), arguments, context) from e.__cause__
            raise ToolError(render(str(e))) from e.__cause__
        return render_call_result(result)


__all__ = ["SafeServer", "argument_error", "render_call_result", "render_value", "report_progress"]
