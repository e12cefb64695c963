"""What an MCP client receives from `gvisor-mcp serve` over stdio.

Each test starts the real server as a subprocess (real runsc underneath) and
asserts on the JSON the SDK's client gets back. The `serve` fixture checks
afterwards that no container, cgroup, bundle or runsc process is left.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import anyio
import pytest

from ..adversarial.conftest import server_pids
from ..conftest import leftovers, seen_by
from .conftest import run, structured, text

pytestmark = pytest.mark.runsc

SNAPSHOT = Path(__file__).with_name("tools_snapshot.json")


def tool_listing(tools) -> list[dict]:
    return [
        {
            "name": t.name,
            "description": t.description,
            "inputSchema": t.input_schema,
            "outputSchema": t.output_schema,
            "annotations": t.annotations.model_dump(mode="json", by_alias=True, exclude_none=True)
            if t.annotations
            else None,
        }
        for t in sorted(tools, key=lambda t: t.name)
    ]


async def test_tool_list_snapshot(serve):
    """The published tools, their schemas and descriptions. To update after a
    deliberate change: GVISOR_MCP_UPDATE_SNAPSHOT=1 scripts/test.sh tests/protocol -k snapshot"""
    async with serve() as c:
        tools = (await c.list_tools()).tools
    got = tool_listing(tools)
    if os.environ.get("GVISOR_MCP_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    # A missing snapshot is a failure, never a fresh one written and passed.
    assert SNAPSHOT.exists(), f"{SNAPSHOT} is missing; write it with GVISOR_MCP_UPDATE_SNAPSHOT=1 and review it"
    assert got == json.loads(SNAPSHOT.read_text())
    names = [t["name"] for t in got]
    assert names == [
        "cancel_command",
        "delete_file",
        "execute_command",
        "inspect_result",
        "list_active",
        "list_files",
        "read_file",
        "write_file",
    ]
    ex = next(t for t in got if t["name"] == "execute_command")
    props = ex["inputSchema"]["properties"]
    assert "NEW" in ex["description"] and "workspace" in ex["description"]
    # The caller's policy shows in the schema: the default policy allows only "none".
    net = props["network"]["anyOf"][0]
    assert net["enum"] == ["none"]
    assert props["memory_mb"]["anyOf"][0]["maximum"] > 0
    assert set(ex["outputSchema"]["properties"]) >= {
        "result_id",
        "container_id",
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "stdout_bytes",
        "stderr_bytes",
        "duration_ms",
        "boot_ms",
        "oom_killed",
        "peak_memory_bytes",
        "limits",
    }


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_echo(serve, mode, sandbox_base):
    async with serve(mode=mode) as c:
        r = await run(c, command="echo hello; echo oops >&2")
    assert not r.is_error
    s = structured(r)
    assert s["status"] == "exited" and s["exit_code"] == 0
    assert s["stdout"] == "hello\n" and s["stderr"] == "oops\n"
    assert s["stdout_bytes"] == 6 and not s["stdout_truncated"]
    assert s["result_id"].startswith("res_")
    assert s["boot_ms"] > 0 and s["duration_ms"] >= s["boot_ms"]
    assert len(s["limits"]["policy_sha256"]) == 64
    assert "hello" in text(r) and "exit_code=0" in text(r)
    # One audit line per call, with who, what, under which policy, and how it ended.
    [entry] = [json.loads(x) for x in (sandbox_base / "state" / "audit.jsonl").read_text().splitlines()]
    assert entry["tenant"] == "default" and entry["command"] == "echo hello; echo oops >&2"
    assert entry["policy_hash"] == s["limits"]["policy_sha256"] and entry["decision"] == "allowed"
    assert entry["status"] == "exited" and entry["exit_code"] == 0 and entry["result_id"] == s["result_id"]
    assert entry["duration_ms"] == s["duration_ms"] and "time" in entry


async def test_nonzero_exit_timeout_and_oom_are_normal_results(serve):
    async with serve() as c:
        r = await run(c, command="exit 3")
        assert not r.is_error and structured(r)["exit_code"] == 3
        assert structured(r)["status"] == "exited"

        r = await run(c, command="sleep 30", timeout_seconds=1)
        s = structured(r)
        assert not r.is_error and s["status"] == "timed_out" and not s["oom_killed"]
        assert "time limit" in text(r)

        r = await run(c, command="python3 -c 'x = bytearray(1 << 30)'", memory_mb=128)
        s = structured(r)
        assert s["status"] == "oom_killed" and s["oom_killed"]
        assert s["peak_memory_bytes"] > 64 << 20
        assert "OOM" in text(r)


async def test_policy_denial_is_actionable(serve):
    async with serve() as c:
        r = await run(c, command="true", network="host")
        assert r.is_error
        msg = text(r)
        # SDK-level validation: the schema enum only offers what the policy allows.
        assert "none" in msg
        r = await run(c, command="true", memory_mb=10**6)
        assert r.is_error
        msg = text(r)
        assert "memory" in msg and "1000000" in msg.replace(",", "") and "allowed" in msg.lower()


async def test_progress_notifications(serve):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    async with serve() as c:
        r = await c.call_tool(
            "execute_command",
            {"command": "for i in 1 2 3; do echo tick $i; sleep 1; done"},
            progress_callback=on_progress,
        )
    assert structured(r)["exit_code"] == 0
    assert len(seen) >= 2, seen
    assert all(t == 120 for _, t, _ in seen)
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)
    assert any("tick" in (m or "") for _, _, m in seen)


async def test_progress_counts_a_flood_and_shows_its_last_line(serve):
    # A cold run's output goes through a file (sandbox/outfile.py): past the
    # cap the server sees the flood's bytes as a count and the last bytes.
    seen = []

    async def on_progress(progress, total, message):
        seen.append(message or "")

    async with serve("--pool-size", "0") as c:
        r = await c.call_tool(
            "execute_command",
            {"command": "head -c 30000000 /dev/zero; echo; echo the-last-line; sleep 3"},
            progress_callback=on_progress,
        )
    s = structured(r)
    assert s["exit_code"] == 0 and s["stdout_bytes"] == 30_000_015 and s["stdout_truncated"]
    late = [m for m in seen if "the-last-line" in m]
    assert late, seen
    assert "30000015 bytes stdout" in late[-1]


@pytest.mark.parametrize("pool", ["0", "2"])
async def test_cancelling_a_foreground_call_kills_its_container(serve, sandbox_base, pool):
    async with serve("--pool-size", pool) as c:
        container = None
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await run(c, command="sleep 60")

            tg.start_soon(call)
            with anyio.fail_after(30):
                while container is None:
                    active = structured(await c.call_tool("list_active", {}))["commands"]
                    container = active[0]["container_id"] if active else None
                    await anyio.sleep(0.05)
            with anyio.fail_after(30):  # the id is known just before runsc creates it
                while container not in leftovers(sandbox_base).get("runsc list", []):
                    await anyio.sleep(0.05)
            scope.cancel()  # the client sends notifications/cancelled
        # ... and the server kills that container.
        with anyio.fail_after(30):
            while container in leftovers(sandbox_base).get("runsc list", []):
                await anyio.sleep(0.1)
        r = await c.call_tool("list_active", {})
        assert structured(r)["commands"] == []


async def test_big_output_pages_back_byte_for_byte(serve):
    script = 'python3 -c "import sys,random; r=random.Random(7); sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(5*1024*1024)))"'
    import random

    rnd = random.Random(7)
    expected = bytes(rnd.getrandbits(8) for _ in range(5 * 1024 * 1024))
    async with serve() as c:
        r = await run(c, command=script)
        s = structured(r)
        assert s["stdout_bytes"] == len(expected)
        assert s["stdout_truncated"]
        assert len(text(r)) < 40_000  # the context is not flooded
        assert "inspect_result(" in text(r)
        got = bytearray()
        offset = 0
        pages = 0
        while offset is not None:
            p = await c.call_tool(
                "inspect_result",
                {"result_id": s["result_id"], "offset": offset, "length": 262144, "encoding": "base64"},
            )
            ps = structured(p)
            page = base64.b64decode(ps["data"])
            assert ps["data_bytes"] == len(page) and ps["offset"] == offset
            got += page
            offset = ps["next_offset"]
            pages += 1
        assert bytes(got) == expected and pages == 20
        # Text pages are for reading: control bytes and invalid UTF-8 are escaped.
        t = structured(await c.call_tool("inspect_result", {"result_id": s["result_id"], "length": 4096}))
        assert t["encoding"] == "text" and t["data_bytes"] == 4096
        assert "\x1b" not in t["data"] and "\x00" not in t["data"] and "\\x00" in t["data"]


async def test_background_list_and_cancel(serve):
    async with serve() as c:
        r = await run(c, command="echo started; sleep 60", background=True)
        s = structured(r)
        assert s["status"] == "running" and s["exit_code"] is None
        rid = s["result_id"]
        listing = structured(await c.call_tool("list_active", {}))
        assert [x["result_id"] for x in listing["commands"]] == [rid]
        assert listing["capacity_in_use"] >= 1 and listing["capacity_max"] >= 1
        # Output of a running command is readable while it runs.
        with anyio.fail_after(30):
            while structured(await c.call_tool("inspect_result", {"result_id": rid}))["data"] != "started\n":
                await anyio.sleep(0.1)
        r = await c.call_tool("cancel_command", {"result_id": rid})
        assert structured(r)["status"] == "killed"
        assert structured(await c.call_tool("list_active", {}))["commands"] == []
        r = await c.call_tool("inspect_result", {"result_id": rid})
        assert structured(r)["status"] == "killed"
        assert structured(r)["data"] == "started\n"


async def test_inspect_waits_for_a_running_command(serve):
    async with serve() as c:
        rid = structured(await run(c, command="sleep 2; echo late", background=True))["result_id"]
        r = await c.call_tool("inspect_result", {"result_id": rid, "wait_seconds": 30})
        s = structured(r)
        assert s["status"] == "exited" and s["data"] == "late\n" and s["next_offset"] is None


@pytest.mark.parametrize("pool", ["0", "2"])
async def test_the_named_workspace_persists_and_another_name_is_separate(serve, sandbox_base, pool):
    """stdio, scope session: the process's workspace is named (default
    `default`) and kept when the server stops: it is the user's work."""
    state = sandbox_base / "state"
    async with serve("--pool-size", pool) as c:
        r = await run(c, command="cd /workspace && echo kept > note.txt && ls -la")
        assert structured(r)["exit_code"] == 0, text(r)
        r = await run(c, command="cat /workspace/note.txt")
        assert structured(r)["stdout"] == "kept\n"
        named = state / "workspaces" / "default" / "named"
        [pid] = server_pids(sandbox_base)
        assert (seen_by(pid, named / "default") / "note.txt").read_text() == "kept\n"
        # Another name (another server process here) has its own, empty workspace.
        async with serve("--pool-size", pool, "--workspace", "other") as other:
            r = await run(other, command="ls -A /workspace; cat /workspace/note.txt")
            assert structured(r)["stdout"] == "" and structured(r)["exit_code"] != 0
    # Kept (unmounted, its image stays) when the servers stop; no session directory at all.
    images = state / "workspaces" / ".images" / "default" / "named"
    assert sorted(p.name for p in images.glob("*.img")) == ["default.img", "other.img"]
    assert not (state / "workspaces" / "default" / "sessions").exists()
    async with serve("--pool-size", pool) as again:
        r = await run(again, command="cat /workspace/note.txt")
        assert structured(r)["stdout"] == "kept\n"


async def test_unknown_result_id(serve):
    async with serve() as c:
        for rid in ("res_" + "0" * 32, "nonsense", "../../etc/passwd"):
            r = await c.call_tool("inspect_result", {"result_id": rid})
            assert r.is_error and "not found" in text(r)


async def test_results_survive_a_restart_and_tenants_are_separate(serve, tmp_path):
    state = tmp_path / "state"
    async with serve(state_dir=state) as c:
        rid = structured(await run(c, command="echo remembered"))["result_id"]
    async with serve(state_dir=state) as c:
        r = await c.call_tool("inspect_result", {"result_id": rid})
        assert structured(r)["data"] == "remembered\n"
    # Another tenant on the same state directory sees nothing of it.
    async with serve("--tenant", "other", "--policy", str(_two_tenant_policy(tmp_path)), state_dir=state) as c:
        r = await c.call_tool("inspect_result", {"result_id": rid})
        assert r.is_error and "not found" in text(r)
        r = await c.call_tool("cancel_command", {"result_id": rid})
        assert r.is_error and "not found" in text(r)


def _two_tenant_policy(tmp_path: Path) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text("version: 1\ntenants:\n  other: {}\n")
    return p


async def test_warm_pool_serves_default_shaped_calls(serve):
    """On by default: a call shaped like the policy's default request claims a
    pre-booted sandbox; a call with another shape (here: process limit) runs
    cold, with no error. Limits are applied at claim either way."""
    async with serve() as c:
        with anyio.fail_after(60):
            while not (s := structured(await run(c, command="echo hi", memory_mb=128)))["warm"]:
                await anyio.sleep(0.2)
        assert s["stdout"] == "hi\n" and s["status"] == "exited"
        granted = {e["field"]: e["granted"] for e in s["limits"]["entries"]}
        assert granted["memory_mb"] == 128
        r = structured(await run(c, command="python3 -c 'bytearray(300*1024*1024)'", memory_mb=128))
        assert r["status"] == "oom_killed" and r["oom_killed"]
        cold = structured(await run(c, command="echo cold", max_pids=77))
        assert cold["stdout"] == "cold\n" and not cold["warm"]
    async with serve("--pool-size", "0") as c:
        for _ in range(3):
            assert not structured(await run(c, command="true"))["warm"]


async def test_past_the_foreground_limit_a_call_returns_running(serve, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nforeground_limit: 1s\n")
    async with serve("--policy", str(policy)) as c:
        s = structured(await run(c, command="sleep 3; echo done"))
        assert s["status"] == "running" and s["exit_code"] is None
        r = structured(await c.call_tool("inspect_result", {"result_id": s["result_id"], "wait_seconds": 30}))
        assert r["status"] == "exited" and r["data"] == "done\n"


async def test_metrics_port_serves_prometheus_text_for_a_stdio_server(serve):
    import socket

    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with serve("--metrics-port", str(port), "--pool-size", "0") as c:
        await run(c, command="exit 4")
        await run(c, command="sleep 5", timeout_seconds=0.5)
        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        r = await http.get(f"http://127.0.0.1:{port}/metrics")
                        break
                    except httpx2.TransportError:
                        await anyio.sleep(0.1)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
    }
    assert samples[("gvisor_mcp_calls_total", (("status", "exited"), ("tenant", "default")))] == 1
    assert samples[("gvisor_mcp_calls_total", (("status", "timed_out"), ("tenant", "default")))] == 1
    assert samples[("gvisor_mcp_timeouts_total", (("tenant", "default"),))] == 1
    assert samples[("gvisor_mcp_pool_claims_total", (("result", "miss"),))] == 2
