"""Where text crosses to the client: every tool result, error and progress message.

`SafeServer` is the MCPServer this project serves. It does two things for
every tool registered on it, so a new tool gets them without asking:

- arguments are validated in pydantic's strict mode (`background: "yes"` or
  `memory_mb: "512"` is refused, not coerced), with an error that names the
  argument, what was sent, what is allowed and how to ask again;
- whatever the call returns or raises passes through `text.render()`: every
  text content, every string in the structured content, every error text.

Progress messages do not pass through a tool's return value: tools send
them with `report_progress()` below, never with `ctx.report_progress`
directly (tests/unit/test_text.py checks the source for that).
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import InfrastructureError, Refusal
from ..runtime import TenantState
from ..text import render
from .context import ToolContext
from .metadata import drop_unserved, server_options

MAX_SHOWN_VALUE = 120
"""Characters of a refused argument's value quoted back (like PolicyDenied)."""


def render_value(value: Any) -> Any:
    """A JSON-like value with every string (keys included) rendered."""
    if isinstance(value, str):
        return render(value)
    if isinstance(value, dict):
        return {render(k) if isinstance(k, str) else k: render_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_value(v) for v in value]
    return value


def render_call_result(result: Any) -> Any:
    """A CallToolResult with its text contents and structured content rendered."""
    if not isinstance(result, CallToolResult):
        return result
    content = [
        TextContent(type="text", text=render(c.text), annotations=c.annotations, meta=c.meta)
        if isinstance(c, TextContent) else c
        for c in result.content
    ]
    structured = render_value(result.structured_content) if result.structured_content is not None else None
    return result.model_copy(update={"content": content, "structured_content": structured})


async def report_progress(ctx: ToolContext, progress: float, total: float | None, message: str) -> None:
    """The only way tools send progress: the message is rendered first."""
    await ctx.report_progress(progress=progress, total=total, message=render(message))


_EXPECTED = {
    "bool_type": "a JSON boolean: true or false",
    "int_type": "a whole number (a JSON integer, not a string)",
    "float_type": "a number (not a string)",
    "string_type": "a string",
    "dict_type": "a JSON object",
    "list_type": "a JSON array",
    "missing": "a value: this argument is required",
}


def argument_error(tool: str, error: ValidationError) -> str:
    """What was wrong with a call's arguments, written for the agent that sent them."""
    lines = []
    for err in error.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        expected = _EXPECTED.get(err["type"]) or err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{where} is missing: it is required. Ask again with {where} set.")
            continue
        shown = repr(err.get("input"))
        if len(shown) > MAX_SHOWN_VALUE:
            shown = shown[: MAX_SHOWN_VALUE - 3] + "..."
        lines.append(
            f"{where}={shown} is not accepted: expected {expected}. "
            f"Ask again with {where} fixed, or leave it out to get its default."
        )
    return f"Invalid arguments for {tool}: " + " ".join(lines)


def _strict(model: type[BaseModel]) -> type[BaseModel]:
    """The SDK's argument model of a tool, in strict mode (same fields, same schema)."""
    return type(model.__name__, (model,), {"model_config": ConfigDict(**{**model.model_config, "strict": True})})


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
            cause = e.__cause__
            # The one place the package's errors become what the agent reads:
            # a refusal says what was asked and allowed; an infrastructure
            # failure says nothing ran. Anything else is a crash.
            if isinstance(cause, Refusal):
                raise ToolError(render(str(cause))) from cause
            if isinstance(cause, InfrastructureError):
                raise ToolError(render(cause.for_agent())) from cause
            # A crash: the SDK's generic text (rendered anyway); the log has the traceback.
            raise UnexpectedToolError(render(str(e))) from e.__cause__
        except ToolError as e:
            if isinstance(e.__cause__, ValidationError):
                raise ToolError(render(argument_error(render(name), e.__cause__))) from e.__cause__
            raise ToolError(render(str(e))) from e.__cause__
        return render_call_result(result)


__all__ = ["SafeServer", "argument_error", "render_call_result", "render_value", "report_progress"]
