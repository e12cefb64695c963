"""What a client learns before any call: serverInfo, capabilities, instructions
and each tool's annotations, over stdio and over HTTP (issue 15, item 4).

Real servers (stdio and HTTP subprocesses, real runsc underneath); the
asserts are on what the SDK's client receives.
"""

from __future__ import annotations

import re
from importlib import metadata

import pytest

from .test_http import running_http_server

pytestmark = pytest.mark.runsc

ALL_HINTS = ("read_only_hint", "destructive_hint", "idempotent_hint", "open_world_hint")
READ_ONLY = (True, False, True, False)
EXPECTED = {
    # tool: (readOnly, destructive, idempotent, openWorld); execute_command's openWorld
    # follows the caller's policy (None here: checked separately).
    "execute_command": (False, True, False, None),
    "inspect_result": READ_ONLY,
    "list_active": READ_ONLY,
    "cancel_command": (False, True, True, False),
    "read_file": READ_ONLY,
    "write_file": (False, True, True, False),
    "list_files": READ_ONLY,
    "delete_file": (False, True, True, False),
    "create_workspace": (False, False, False, False),
    "delete_workspace": (False, True, True, False),
}

# alice may use the host network (egress); bob has only `none`.
POLICY = """\
version: 1
network: {allowed: [none, host]}
tenants:
  alice: {}
  bob:
    network: {allowed: [none]}
"""


def hints(tools) -> dict[str, tuple]:
    out = {}
    for t in tools:
        a = t.annotations
        assert a is not None, f"{t.name} has no annotations"
        values = tuple(getattr(a, h) for h in ALL_HINTS)
        assert None not in values, f"{t.name} leaves a hint to the spec's default: {a}"
        out[t.name] = values
    return out


def check_tools(tools, *, open_world: bool) -> None:
    got = hints(tools)
    for name, values in got.items():
        want = EXPECTED[name]
        if name == "execute_command":
            want = want[:3] + (open_world,)
        assert values == want, (name, values, want)


def check_instructions(instructions: str | None, tools) -> None:
    """Every tool is named in the instructions, and every tool-like name there is a tool."""
    assert instructions
    names = {t.name for t in tools}
    for name in names:
        assert name in instructions, (name, instructions)
    mentioned = set(re.findall(r"\b(?:execute|inspect|list|cancel|read|write|delete|create)_[a-z]+\b", instructions))
    assert mentioned <= names, (mentioned - names, instructions)


def capabilities(client) -> dict:
    return client.server_capabilities.model_dump(mode="json", by_alias=True, exclude_none=True)


def check_capabilities(caps: dict) -> None:
    """Only what is implemented: tools and resources (list/read/templates), no
    subscriptions, no list-changed notifications, no prompts, logging or completions."""
    assert set(caps) == {"tools", "resources"}, caps
    assert not caps["tools"].get("listChanged"), caps
    assert not caps["resources"].get("subscribe") and not caps["resources"].get("listChanged"), caps


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_server_info_capabilities_instructions_and_annotations(serve, mode):
    async with serve(mode=mode) as c:
        info = c.server_info
        tools = (await c.list_tools()).tools
        caps = capabilities(c)
        instructions = c.instructions
    assert info is not None and info.name == "gvisor-mcp"
    assert info.version == metadata.version("gvisor-mcp") != ""
    check_capabilities(caps)
    check_tools(tools, open_world=False)  # the default policy allows only network none
    check_instructions(instructions, tools)
    assert "create_workspace" not in {t.name for t in tools}


async def test_http_gives_each_tenant_its_hints_and_the_same_capabilities_as_stdio(serve, sandbox_base, tmp_path):
    async with serve() as c:
        stdio_caps = {"auto": capabilities(c)}
    async with serve(mode="legacy") as c:
        stdio_caps["legacy"] = capabilities(c)
    with running_http_server(sandbox_base, tmp_path, policy_text=POLICY) as server:
        for mode in ("auto", "legacy"):
            for tenant, egress in (("alice", True), ("bob", False)):
                async with server.client(tenant, mode=mode) as c:
                    assert c.server_info is not None
                    assert c.server_info.version == metadata.version("gvisor-mcp")
                    assert capabilities(c) == stdio_caps[mode], (mode, tenant)
                    tools = (await c.list_tools()).tools
                    check_tools(tools, open_world=egress)
                    check_instructions(c.instructions, tools)
                    # HTTP under scope session: agents may create workspaces.
                    assert {"create_workspace", "delete_workspace"} <= {t.name for t in tools}
                    if tenant == "alice":
                        assert "none, host" in c.instructions
    check_capabilities(stdio_caps["auto"])
