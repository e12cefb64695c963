"""The MCP tools, one module each; register_tools wires them to a server."""

from __future__ import annotations

from inspect import cleandoc
from typing import Any

from mcp.types import ToolAnnotations

from .active import list_active, make_cancel_tool
from .execute import make_execute_tool
from .inspect import make_inspect_tool
from .view import SchemaFacts


def register_tools(server: Any, facts: SchemaFacts) -> None:
    """Register the four tools; their schemas come from `facts` (the caller's policy)."""

    def add(fn: Any, **kw: Any) -> None:
        # Docstrings are the descriptions the model reads: no source indentation.
        server.add_tool(fn, description=cleandoc(fn.__doc__ or ""), **kw)

    add(
        make_execute_tool(facts),
        name="execute_command",
        title="Run a shell command in a fresh gVisor sandbox",
        annotations=ToolAnnotations(destructive_hint=True, open_world_hint="host" in facts.networks or "sandbox" in facts.networks),
    )
    add(
        make_inspect_tool(facts.head_bytes, facts.tail_bytes),
        name="inspect_result",
        title="Read a result and page its output",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    add(
        list_active,
        name="list_active",
        title="List your running commands",
        annotations=ToolAnnotations(read_only_hint=True),
    )
    add(
        make_cancel_tool(facts.head_bytes, facts.tail_bytes),
        name="cancel_command",
        title="Kill a running command",
        annotations=ToolAnnotations(destructive_hint=True),
    )
