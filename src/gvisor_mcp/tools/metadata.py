"""What a client learns about the server before any call: its version, each
tool's annotations, the capabilities and the instructions.

Annotations are hints a client uses to decide whether to ask its user before
a call (the spec's defaults are the cautious ones: not read-only,
destructive, not idempotent, open world). Every tool states all four, so no
client falls back on a default that is wrong here:

- read-only: inspect_result, list_active, read_file, list_files;
- destructive (may remove or overwrite what the caller had): execute_command
  (a command can change the workspace), write_file (replaces a file),
  delete_file, delete_workspace, cancel_command (kills a command);
- idempotent (the same call again changes nothing more): write_file (same
  content), delete_file and delete_workspace (gone already: the second call
  says so), cancel_command (a finished command is returned as it ended);
  never execute_command or create_workspace (each call makes a new run or
  workspace);
- open world: only execute_command, and only when the caller's policy lets a
  run reach beyond this machine (network `host`, or `sandbox` with an egress
  allowlist). Tool lists are built per tenant (over HTTP each tenant has its
  own server, see http.py), so the hint is the caller's own. The file tools
  work on local workspaces and projects: never open world.

The instructions are written from the tools actually registered: a tool
without a sentence here fails registration, so they stay true as tools are
added (tests/protocol/test_metadata.py checks both ways).
"""

from __future__ import annotations

from typing import Any

from mcp.types import ToolAnnotations

from ..version import package_version


def _hints(
    *, read_only: bool = False, destructive: bool = False, idempotent: bool = False, open_world: bool = False
) -> ToolAnnotations:
    if read_only:
        destructive, idempotent = False, True
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=open_world
    )


def tool_annotations(tool: str, *, egress: bool) -> ToolAnnotations:
    """The four hints of `tool`; `egress`: the caller's policy lets a run leave this machine."""
    return {
        "execute_command": _hints(destructive=True, open_world=egress),
        "inspect_result": _hints(read_only=True),
        "list_active": _hints(read_only=True),
        "cancel_command": _hints(destructive=True, idempotent=True),
        "read_file": _hints(read_only=True),
        "write_file": _hints(destructive=True, idempotent=True),
        "list_files": _hints(read_only=True),
        "delete_file": _hints(destructive=True, idempotent=True),
        "create_workspace": _hints(),
        "delete_workspace": _hints(destructive=True, idempotent=True),
    }[tool]


def instructions(tools: list[str], facts: Any, file_facts: Any) -> str:
    """The server's instructions for the tools in `tools`, under the caller's policy."""
    if facts.workspace:
        keeps = f"except files in the workspace ({facts.workspace})"
        if file_facts.agent_workspaces:
            keeps += " (a call without a session has one only when it passes a create_workspace id)"
    else:
        keeps = "(this policy mounts no workspace)"
    network = ", ".join(facts.networks)
    sentences: list[tuple[tuple[str, ...], str]] = [
        (
            ("execute_command",),
            "execute_command runs a shell command in a NEW, isolated gVisor sandbox. Nothing carries "
            "over between calls (no cd, no exported variables, no background processes, no installed "
            f"packages) {keeps}. Network modes: {network}.",
        ),
        (
            ("inspect_result",),
            "Long output is cut to its head and tail; the marker in the text gives the inspect_result "
            "call that reads the rest: send it as written, then repeat it with offset=next_offset "
            "as the marker says. inspect_result(wait_seconds=...) waits for a running command; "
            "receipt=true shows every limit granted and why.",
        ),
        (("list_active", "cancel_command"), "list_active shows your commands still running; cancel_command stops one."),
        (
            ("read_file", "write_file", "list_files", "delete_file"),
            "read_file, write_file, list_files and delete_file work on the workspace and the "
            "operator's projects without starting a sandbox.",
        ),
        (
            ("create_workspace", "delete_workspace"),
            "create_workspace gives you a private workspace: pass its id as `workspace` to "
            "execute_command and the file tools; delete_workspace removes it.",
        ),
    ]
    registered = set(tools)
    used = [(names, text) for names, text in sentences if registered >= set(names)]
    unsaid = registered - {name for names, _ in used for name in names}
    if unsaid:
        raise KeyError(f"no instructions for tool(s) {sorted(unsaid)}: write them in tools/metadata.py")
    return " ".join(text for _, text in used)


UNSERVED = ("prompts/list", "prompts/get")
"""Methods the SDK's MCPServer serves by default that this server has nothing for:
without them the `prompts` capability is not advertised."""


def server_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """MCPServer arguments for what this server implements: its package version, and no
    `subscriptions/listen` (nothing here sends list-changed or resource-updated
    notifications, so neither `listChanged` nor `resources.subscribe` is advertised,
    over stdio or HTTP, at any protocol version)."""
    return {"version": package_version(), "subscriptions": False, **kwargs}


def drop_unserved(lowlevel: Any) -> None:
    """Remove the handlers of UNSERVED (the SDK derives capabilities from its handlers).
    `_request_handlers` is private to the SDK; tests/protocol/test_metadata.py pins it."""
    for method in UNSERVED:
        lowlevel._request_handlers.pop(method, None)
