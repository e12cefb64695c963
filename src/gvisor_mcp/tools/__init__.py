"""The MCP tools, one module each; register_tools wires them to a server."""

from __future__ import annotations

from inspect import cleandoc
from typing import Any

from mcp.types import ToolAnnotations

from .active import list_active, make_cancel_tool
from .execute import make_execute_tool
from .files import FileFacts, make_file_tools
from .inspect import make_inspect_tool
from .resources import register_resources
from .view import SchemaFacts
from .workspaces import create_workspace, delete_workspace


def register_tools(server: Any, facts: SchemaFacts, file_facts: FileFacts) -> None:
    """Register the tools and the workspace resources; their schemas come from
    `facts` and `file_facts` (the caller's policy)."""

    def add(fn: Any, **kw: Any) -> None:
        # Docstrings are the descriptions the model reads: no source indentation.
        server.add_tool(fn, description=cleandoc(fn.__doc__ or ""), **kw)

    add(
        make_execute_tool(facts, file_facts.agent_workspaces),
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
    read_file, write_file, list_files, delete_file = make_file_tools(file_facts)
    add(read_file, name="read_file", title="Read a file (no sandbox needed)",
        annotations=ToolAnnotations(read_only_hint=True))
    add(write_file, name="write_file", title="Write a whole file atomically (no sandbox needed)",
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True))
    add(list_files, name="list_files", title="List a directory (no sandbox needed)",
        annotations=ToolAnnotations(read_only_hint=True))
    add(delete_file, name="delete_file", title="Delete a file or directory (no sandbox needed)",
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False))
    if file_facts.agent_workspaces:
        add(create_workspace, name="create_workspace", title="Create a private workspace",
            annotations=ToolAnnotations(destructive_hint=False))
        add(delete_workspace, name="delete_workspace", title="Delete a workspace you created",
            annotations=ToolAnnotations(destructive_hint=True))
    register_resources(server)
