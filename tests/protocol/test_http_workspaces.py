"""Two HTTP clients of ONE tenant, under each workspace scope and both protocol
generations: `scope: session` never silently becomes sharing.

- classic sessions (mode="legacy"): each MCP session has its own workspace;
- protocol 2026-07-28 (the SDK client's default, sessionless): a call has no
  workspace until the agent creates one, and a created one is reached only
  through its id;
- `scope: tenant`: one workspace shared by the tenant's clients, as the
  policy says.
"""

from __future__ import annotations

import anyio
import pytest

from .test_http import running_http_server

pytestmark = pytest.mark.runsc

SESSION = "version: 1\nworkspace: {scope: session, size: 16MiB}\ntenants:\n  alice: {}\n  bob: {}\n"
TENANT = "version: 1\nworkspace: {scope: tenant, size: 16MiB}\ntenants:\n  alice: {}\n  bob: {}\n"


def text(r) -> str:
    return "\n".join(c.text for c in r.content if c.type == "text")


async def ok(c, tool: str, **args) -> dict:
    r = await c.call_tool(tool, args)
    assert not r.is_error, text(r)
    return r.structured_content


async def err(c, tool: str, **args) -> str:
    r = await c.call_tool(tool, args)
    assert r.is_error, text(r)
    return text(r)


@pytest.fixture
def session_server(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path, policy_text=SESSION) as server:
        yield server


@pytest.fixture
def tenant_server(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path, policy_text=TENANT) as server:
        yield server


async def test_scope_session_with_classic_sessions_keeps_clients_apart(session_server):
    async with session_server.client("alice", "legacy") as a, session_server.client("alice", "legacy") as b:
        tools = {t.name: t for t in (await a.list_tools()).tools}
        assert "create_workspace" in tools and "workspace" in tools["write_file"].input_schema["properties"]
        await ok(a, "write_file", path="mine.txt", content="a's\n")
        s = await ok(a, "execute_command", command="cat /workspace/mine.txt")
        assert s["stdout"] == "a's\n"
        assert "does not exist" in await err(b, "read_file", path="mine.txt")
        s = await ok(b, "execute_command", command="ls -A /workspace")
        assert s["stdout"] == "" and s["exit_code"] == 0
        assert [r.uri for r in (await a.list_resources()).resources] == ["workspace:///mine.txt"]
        assert (await b.list_resources()).resources == []


async def test_scope_session_without_sessions_is_never_shared(session_server, sandbox_base):
    """Protocol 2026-07-28: no session, so no workspace, unless created."""
    async with (
        session_server.client("alice") as a,
        session_server.client("alice") as b,
        session_server.client("bob") as bob,
    ):
        r = await a.call_tool("execute_command", {"command": "pwd; ls /workspace"})
        s = r.structured_content
        assert s["stdout"] == "/tmp\n" and s["exit_code"] != 0  # no /workspace at all
        assert "create_workspace" in text(r)  # the receipt's note says how to get one
        assert "create_workspace" in await err(a, "write_file", path="f.txt", content="x")
        assert "create_workspace" in await err(b, "list_files")
        assert (await a.list_resources()).resources == []

        mine = (await ok(a, "create_workspace"))["workspace"]
        theirs = (await ok(b, "create_workspace"))["workspace"]
        assert mine != theirs and mine.startswith("ws_") and len(mine) == 35
        await ok(a, "write_file", path="f.txt", content="a's file\n", workspace=mine)
        s = await ok(a, "execute_command", command="cat f.txt && echo more >> f.txt", workspace=mine)
        assert s["stdout"] == "a's file\n"
        assert (await ok(a, "read_file", path="f.txt", workspace=mine))["data"] == "a's file\nmore\n"
        # As a resource too: the workspace's id is the URI's authority.
        r = await a.read_resource(f"workspace://{mine}/f.txt")
        assert r.contents[0].text == "a's file\nmore\n"
        # b's workspace is its own; an id it does not hold reads as "not found", like any other.
        assert "does not exist" in await err(b, "read_file", path="f.txt", workspace=theirs)
        s = await ok(b, "execute_command", command="ls -A /workspace", workspace=theirs)
        assert s["stdout"] == ""
        unknown = await err(b, "read_file", path="f.txt", workspace="ws_" + "0" * 32)
        other_tenant = await err(bob, "read_file", path="f.txt", workspace=mine)
        assert unknown.replace("ws_" + "0" * 32, "X") == other_tenant.replace(mine, "X")
        assert "not found" in unknown and "create_workspace" in unknown
        # Deleting it removes its files and its image; the id is then unknown.
        assert "deleted" in text(await a.call_tool("delete_workspace", {"workspace": mine}))
        assert "not found" in await err(a, "read_file", path="f.txt", workspace=mine)
        sessions = session_server.state / "workspaces" / "alice" / "sessions"
        with anyio.fail_after(30):
            while (sessions / mine).exists():
                await anyio.sleep(0.1)
        assert (sessions / theirs).is_dir()


async def test_scope_tenant_is_shared_by_the_tenants_clients(tenant_server):
    for mode in ("legacy", "auto"):
        async with (
            tenant_server.client("alice", mode) as a,
            tenant_server.client("alice", mode) as b,
            tenant_server.client("bob", mode) as bob,
        ):
            tools = {t.name: t for t in (await a.list_tools()).tools}
            assert "create_workspace" not in tools
            assert "workspace" not in tools["execute_command"].input_schema["properties"]
            await ok(a, "write_file", path=f"{mode}.txt", content="shared\n")
            assert (await ok(b, "read_file", path=f"{mode}.txt"))["data"] == "shared\n"
            s = await ok(b, "execute_command", command=f"cat /workspace/{mode}.txt")
            assert s["stdout"] == "shared\n"
            assert "does not exist" in await err(bob, "read_file", path=f"{mode}.txt")
