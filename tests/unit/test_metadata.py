"""tools/metadata.py: instructions follow the registered tools; every hint is explicit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gvisor_mcp.tools.metadata import instructions, tool_annotations
from gvisor_mcp.version import package_version

TOOLS = [
    "execute_command",
    "inspect_result",
    "list_active",
    "cancel_command",
    "read_file",
    "write_file",
    "list_files",
    "delete_file",
]


def facts(workspace: str | None = "/workspace") -> SimpleNamespace:
    return SimpleNamespace(workspace=workspace, networks=("none", "sandbox"))


def test_a_tool_without_instructions_fails_registration() -> None:
    with pytest.raises(KeyError, match="no instructions for tool.*'run_later'"):
        instructions([*TOOLS, "run_later"], facts(), SimpleNamespace(agent_workspaces=False))


def test_instructions_name_only_registered_tools_and_the_policy() -> None:
    text = instructions(TOOLS, facts(None), SimpleNamespace(agent_workspaces=False))
    assert "create_workspace" not in text and "delete_workspace" not in text
    assert "this policy mounts no workspace" in text and "Network modes: none, sandbox." in text
    # Half of a pair is not enough for its sentence: the tool goes unsaid, which fails.
    with pytest.raises(KeyError, match="create_workspace"):
        instructions([*TOOLS, "create_workspace"], facts(), SimpleNamespace(agent_workspaces=True))


def test_every_hint_is_explicit_and_egress_sets_open_world() -> None:
    for tool in [*TOOLS, "create_workspace", "delete_workspace"]:
        a = tool_annotations(tool, egress=False)
        assert None not in (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint), tool
        assert a.open_world_hint is False
    assert tool_annotations("execute_command", egress=True).open_world_hint is True
    assert tool_annotations("read_file", egress=True).open_world_hint is False
    assert package_version() != ""
