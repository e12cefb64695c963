"""The command tools as an MCP client sees them (JSON it receives), around a
FakeManager: execute_command, inspect_result, list_active, cancel_command."""

from __future__ import annotations

import base64

import anyio

from gvisor_mcp.sandbox import ContainerStatus, SandboxError

from .conftest import structured, text, wire

EXEC_FIELDS = {
    "result_id",
    "container_id",
    "status",
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "stdout_bytes",
    "stderr_bytes",
    "duration_ms",
    "boot_ms",
    "warm",
    "oom_killed",
    "peak_memory_bytes",
    "limits",
    "error",
    "network",
}


async def test_a_command_is_resolved_by_the_policy_run_and_reported(fast):
    async with fast() as srv, srv.client() as client:
        r = await client.call_tool(
            "execute_command", {"command": "echo hi", "memory_mb": 256, "env": {"GREETING": "hello"}}
        )
        out = wire(r)
        assert out["isError"] is False
        s = out["structuredContent"]
        assert set(s) == EXEC_FIELDS
        assert (s["status"], s["exit_code"], s["stdout"], s["stdout_bytes"]) == ("exited", 0, "hi\n", 3)
        assert s["result_id"].startswith("res_") and s["container_id"] == "fake-0001"
        # The compact receipt: only what was requested (memory_mb, env), plus the policy hash.
        granted = {e["field"]: e["granted"] for e in s["limits"]["entries"]}
        assert granted == {"memory_mb": 256, "env": ["GREETING"]} and s["limits"]["policy_sha256"]
        full = wire(await client.call_tool("inspect_result", {"result_id": s["result_id"], "receipt": True}))
        assert full["structuredContent"]["limits"]["tenant"] == "default"
        [t] = [c["text"] for c in out["content"]]
        assert t.startswith("status=exited exit_code=0 ") and f"result_id={s['result_id']}" in t
        assert t.endswith("--- stdout ---\nhi\n")
        # What reached the sandbox layer: the policy's resolution, not the raw request.
        [opts] = srv.fake.runs
        assert opts.command == ("/bin/sh", "-c", "echo hi")
        assert opts.resources.memory_mb == 256 and opts.env is not None and opts.env["GREETING"] == "hello"
        # The warm pool was aimed at the tenant's default request at start.
        assert [size for _, size in srv.fake.warmed] == [2]
    [line] = srv.audit()
    assert (line["decision"], line["status"], line["command"], line["result_id"]) == (
        "allowed",
        "exited",
        "echo hi",
        s["result_id"],
    )


async def test_failing_commands_are_normal_results_with_their_status(fast):
    async with fast() as srv, srv.client() as client:
        srv.fake.script("false", exit_code=1)
        srv.fake.script("sleep 99", status=ContainerStatus.TIMED_OUT, exit_code=137)
        srv.fake.script("hog", status=ContainerStatus.OOM_KILLED, exit_code=137, peak_memory_bytes=512 << 20)
        got = {}
        for command in ("false", "sleep 99", "hog", "nothing-scripted"):
            r = await client.call_tool("execute_command", {"command": command})
            assert r.is_error is False
            got[command] = structured(r)
        assert (got["false"]["status"], got["false"]["exit_code"]) == ("exited", 1)
        assert got["sleep 99"]["status"] == "timed_out"
        assert "hit its time limit" in text(
            await client.call_tool("inspect_result", {"result_id": got["sleep 99"]["result_id"]})
        )
        assert got["hog"]["status"] == "oom_killed" and got["hog"]["oom_killed"] is True
        assert got["nothing-scripted"]["exit_code"] == 127
        assert "fake: no script" in got["nothing-scripted"]["stderr"]


async def test_a_policy_refusal_is_an_actionable_error_and_runs_nothing(fast):
    async with fast() as srv, srv.client() as client:
        r = await client.call_tool("execute_command", {"command": "echo big", "memory_mb": 4096})
        assert r.is_error and r.structured_content is None
        msg = text(r)
        assert "memory" in msg and "1024" in msg, msg  # what was asked and what is allowed
        r = await client.call_tool("execute_command", {"command": "echo x", "env": {"LD_PRELOAD": "/x.so"}})
        assert r.is_error and "LD_PRELOAD" in text(r)
        assert srv.fake.runs == []
    assert [(a["decision"], a["command"]) for a in srv.audit()] == [("denied", "echo big"), ("denied", "echo x")]


async def test_schemas_publish_the_callers_policy(fast):
    async with fast() as srv, srv.client() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "execute_command",
        "inspect_result",
        "list_active",
        "cancel_command",
        "read_file",
        "write_file",
        "list_files",
        "delete_file",
    }
    props = tools["execute_command"].input_schema["properties"]
    memory = [s for s in props["memory_mb"]["anyOf"] if s.get("type") == "integer"][0]
    assert memory["maximum"] == 1024
    network = [s for s in props["network"]["anyOf"] if "enum" in s][0]
    assert network["enum"] == ["none"]
    assert tools["execute_command"].output_schema is not None
    assert "/project" in tools["read_file"].description


async def test_long_output_is_cut_and_pages_back_byte_for_byte(fast):
    data = bytes(range(256)) * 1200  # 300 KiB, every byte value
    async with fast() as srv, srv.client() as client:
        srv.fake.script("cat blob", stdout=data)
        r = structured(await client.call_tool("execute_command", {"command": "cat blob"}))
        assert r["stdout_truncated"] is True and r["stdout_bytes"] == len(data)
        assert "inspect_result" in r["stdout"]  # the marker says how to read the rest
        rid, got, offset = r["result_id"], b"", 0
        while offset is not None:
            page = structured(
                await client.call_tool(
                    "inspect_result", {"result_id": rid, "offset": offset, "length": 100_000, "encoding": "base64"}
                )
            )
            assert page["total_bytes"] == len(data)
            got += base64.b64decode(page["data"])
            offset = page["next_offset"]
        assert got == data
        page = structured(await client.call_tool("inspect_result", {"result_id": rid, "length": 16}))
        # text: control bytes escaped (tab and newline kept), never raw
        assert page["data"] == "".join(f"\\x{b:02x}" for b in range(9)) + "\t\n\\x0b\\x0c\\x0d\\x0e\\x0f"
        assert page["next_offset"] == 16 and page["data_bytes"] == 16


async def test_background_list_and_cancel(fast):
    async with fast() as srv, srv.client() as client:
        srv.fake.script("sleep 60", block=True, stdout=b"started\n")
        bg = structured(await client.call_tool("execute_command", {"command": "sleep 60", "background": True}))
        assert bg["status"] == "running" and bg["exit_code"] is None
        rid = bg["result_id"]
        listing = structured(await client.call_tool("list_active", {}))
        assert [c["result_id"] for c in listing["commands"]] == [rid]
        assert listing["commands"][0]["command"] == "sleep 60"
        assert (listing["capacity_in_use"], listing["capacity_max"]) == (1, 4)
        # Live output is readable while it runs.
        live = structured(await client.call_tool("inspect_result", {"result_id": rid}))
        assert live["status"] == "running" and live["data"] == "started\n" and live["next_offset"] == 8
        waited = structured(await client.call_tool("inspect_result", {"result_id": rid, "wait_seconds": 0.2}))
        assert waited["status"] == "running"
        done = structured(await client.call_tool("cancel_command", {"result_id": rid}))
        assert (done["status"], done["signal"], done["stdout"]) == ("killed", 9, "started\n")
        assert structured(await client.call_tool("list_active", {}))["commands"] == []
        again = await client.call_tool("cancel_command", {"result_id": rid})  # already ended: as it ended
        assert not again.is_error and structured(again)["status"] == "killed"


async def test_past_the_foreground_limit_a_call_returns_running(fast):
    async with fast(policy_extra="  quick:\n    foreground_limit: 1s\n") as srv, srv.client("quick") as client:
        srv.fake.script("make", block=True)
        r = structured(await client.call_tool("execute_command", {"command": "make"}))
        assert r["status"] == "running"
        assert "wait_seconds" in text(await client.call_tool("inspect_result", {"result_id": r["result_id"]}))
        await client.call_tool("cancel_command", {"result_id": r["result_id"]})


async def test_unknown_and_other_tenants_results_are_not_found_alike(fast):
    async with fast() as srv, srv.client("alice") as alice, srv.client("bob") as bob:
        mine = structured(await alice.call_tool("execute_command", {"command": "echo secret"}))
        rid = mine["result_id"]
        assert structured(await alice.call_tool("inspect_result", {"result_id": rid}))["data"] == "secret\n"
        other = "res_" + "0" * 32
        for tool in ("inspect_result", "cancel_command"):
            theirs = await bob.call_tool(tool, {"result_id": rid})
            unknown = await bob.call_tool(tool, {"result_id": other})
            assert theirs.is_error and unknown.is_error
            assert text(theirs).replace(rid, "X") == text(unknown).replace(other, "X")
            assert "secret" not in text(theirs)
        bg = structured(await alice.call_tool("execute_command", {"command": "echo bg", "background": True}))
        with anyio.fail_after(5):
            while (
                structured(await alice.call_tool("inspect_result", {"result_id": bg["result_id"]}))["status"]
                == "running"
            ):
                await anyio.sleep(0.01)
        assert structured(await bob.call_tool("list_active", {}))["commands"] == []


async def test_quotas_are_clear_errors_and_hold_up_no_other_tenant(fast):
    extra = "  carol:\n    quotas: {runs_per_minute: 2}\n"
    async with (
        fast(policy_extra=extra) as srv,
        srv.client("alice") as alice,
        srv.client("bob") as bob,
        srv.client("carol") as carol,
    ):
        srv.fake.script("sleep 60", block=True)
        first = structured(await alice.call_tool("execute_command", {"command": "sleep 60", "background": True}))
        over = await alice.call_tool("execute_command", {"command": "echo second"})
        assert over.is_error and "max_concurrent=1" in text(over) and "cancel_command" in text(over)
        assert structured(await bob.call_tool("execute_command", {"command": "echo bob"}))["stdout"] == "bob\n"
        await alice.call_tool("cancel_command", {"result_id": first["result_id"]})
        for _ in range(2):
            assert not (await carol.call_tool("execute_command", {"command": "echo c"})).is_error
        third = await carol.call_tool("execute_command", {"command": "echo c"})
        assert third.is_error and "runs_per_minute=2" in text(third) and "retry in" in text(third)
    decisions = [(a["tenant"], a["decision"]) for a in srv.audit() if a.get("decision") != "allowed"]
    assert decisions == [("alice", "quota"), ("carol", "quota")]


async def test_an_infrastructure_failure_is_a_stored_error_result(fast):
    async with fast() as srv, srv.client() as client:
        srv.fake.script("boom", raises=SandboxError("runsc create failed: no space left"))
        r = await client.call_tool("execute_command", {"command": "boom"})
        s = structured(r)
        assert r.is_error is False and s["status"] == "error" and s["exit_code"] is None
        assert "sandbox failure" in s["error"] and "no space left" in s["error"]
        again = structured(await client.call_tool("inspect_result", {"result_id": s["result_id"]}))
        assert again["status"] == "error"


async def test_shutdown_kills_running_commands_and_records_them(fast):
    async with fast() as srv:
        async with srv.client() as client:
            srv.fake.script("serve forever", block=True)
            rid = structured(
                await client.call_tool("execute_command", {"command": "serve forever", "background": True})
            )["result_id"]
        store = srv.rt.store
    stored = store.__class__(srv.state).get(rid, "default")
    assert stored is not None and stored.status == "killed"
    assert "shut down" in (stored.error or "")
