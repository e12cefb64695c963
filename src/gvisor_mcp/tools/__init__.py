"""The MCP tools, one module each; register_tools wires them to a server."""

from __future__ import annotations

from inspect import cleandoc
from typing import Any

from .active import list_active, make_cancel_tool
from .execute import make_execute_tool
from .files import FileFacts, make_file_tools
from .inspect import make_inspect_tool
from .metadata import instructions, tool_annotations
from .resources import register_resources
from .view import SchemaFacts
from .workspaces import create_workspace, delete_workspace


def register_tools(server: Any, facts: SchemaFacts, file_facts: FileFacts) -> None:
    """Register the tools and the workspace resources; their schemas, annotations and
    the server's instructions come from `facts` and `file_facts` (the caller's policy)."""
    added: list[str] = []

    def add(fn: Any, name: str, title: str) -> None:
        # Docstrings are the descriptions the model reads: no source indentation.
        server.add_tool(
            fn,
            name=name,
            title=title,
            description=cleandoc(fn.__doc__ or ""),
            annotations=tool_annotations(name, egress=facts.egress),
        )
        added.append(name)

    add(
        make_execute_tool(facts, file_facts.agent_workspaces),
        "execute_command",
        "Run a shell command in a fresh gVisor sandbox",
    )
    add(make_inspect_tool(), "inspect_result", "Read a result and page its output")
    add(list_active, "list_active", "List your running commands")
    add(make_cancel_tool(facts.head_bytes, facts.tail_bytes), "cancel_command", "Kill a running command")
    read_file, write_file, list_files, delete_file = make_file_tools(file_facts)
    add(read_file, "read_file", "Read a file (no sandbox needed)")
    add(write_file, "write_file", "Write a whole file atomically (no sandbox needed)")
    add(list_files, "list_files", "List a directory (no sandbox needed)")
    add(delete_file, "delete_file", "Delete a file or directory (no sandbox needed)")
    if file_facts.agent_workspaces:
        add(create_workspace, "create_workspace", "Create a private workspace")
        add(delete_workspace, "delete_workspace", "Delete a workspace you created")
    register_resources(server)
    # The instructions name exactly the tools registered above (MCPServer keeps them
    # on its lowlevel server, which sends them in initialize and server/discover).
    server._lowlevel_server.instructions = instructions(added, facts, file_facts)
