"""The server's life: shutdown by signal or closed stdin, SIGKILL and recovery, refusal to start.

These need the server's pid, which the SDK's stdio client hides, so they speak
newline-delimited JSON-RPC to `gvisor-mcp serve` directly (the stdio
transport is exactly that) and check the same things a client would see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import BIN

pytestmark = pytest.mark.runsc


class RawServer:
    """`gvisor-mcp serve` as a subprocess, driven line by line."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self._next = 0
        self._buf = b""

    async def send(self, message: dict) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(message).encode() + b"\n")

    async def receive(self) -> dict:
        assert self.process.stdout is not None
        while b"\n" not in self._buf:
            self._buf += await self.process.stdout.receive()
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def request(self, method: str, params: dict) -> dict:
        self._next += 1
        rid = self._next
        await self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        while True:
            msg = await self.receive()
            if msg.get("id") == rid:
                assert "error" not in msg, msg
                return msg["result"]

    async def initialize(self) -> None:
        await self.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "lifecycle-test", "version": "0"},
            },
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def call(self, name: str, arguments: dict) -> dict:
        result = await self.request("tools/call", {"name": name, "arguments": arguments})
        return result["structuredContent"]

    async def call_raw(self, name: str, arguments: dict) -> dict:
        return await self.request("tools/call", {"name": name, "arguments": arguments})


def serve_argv(base: Path, state: Path, *extra: str) -> list[str]:
    return [
        str(BIN),
        "serve",
        "--state-root",
        str(base),
        "--cgroup-parent",
        CGROUP_PARENT,
        "--state-dir",
        str(state),
        *extra,
    ]


async def start(base: Path, state: Path, *extra: str) -> RawServer:
    process = await anyio.open_process(
        serve_argv(base, state, *extra),
        stderr=subprocess.DEVNULL,
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "WARNING"},
    )
    server = RawServer(process)
    with anyio.fail_after(60):
        await server.initialize()
    return server


async def wait_exit(server: RawServer, seconds: float = 30) -> int:
    with anyio.fail_after(seconds):
        return await server.process.wait()


async def until_running(server: RawServer, n: int) -> list[dict]:
    """Wait until n background commands are inside their sandboxes."""
    with anyio.fail_after(30):
        while True:
            active = (await server.call("list_active", {}))["commands"]
            if len(active) == n and all(a["container_id"] for a in active):
                return active
            await anyio.sleep(0.1)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "stdin closed"])
async def test_shutdown_kills_running_commands_and_records_them(sandbox_base, tmp_path, how):
    state = tmp_path / "state"
    server = await start(sandbox_base, state)
    rid = (await server.call("execute_command", {"command": "sleep 600", "background": True}))["result_id"]
    await until_running(server, 1)
    if how == "stdin closed":
        await server.process.stdin.aclose()  # type: ignore[union-attr]
    else:
        server.process.send_signal(getattr(signal, how))
    assert await wait_exit(server) == 0
    assert leftovers(sandbox_base) == {}
    # The result was recorded as killed, not lost, and says why.
    server = await start(sandbox_base, state, "--pool-size", "0")
    try:
        r = await server.call("inspect_result", {"result_id": rid})
        assert r["status"] == "killed" and "shut down" in r["error"]
    finally:
        await server.process.stdin.aclose()  # type: ignore[union-attr]
        await wait_exit(server)
    assert leftovers(sandbox_base) == {}


async def test_sigkill_then_restart_reaps_everything_and_reports_interrupted_runs(sandbox_base, tmp_path):
    state = tmp_path / "state"
    server = await start(sandbox_base, state)
    done = await server.call("execute_command", {"command": "echo finished"})
    assert done["status"] == "exited"
    rids = [
        (await server.call("execute_command", {"command": f"echo {i}; sleep 600", "background": True}))["result_id"]
        for i in range(3)
    ]
    await until_running(server, 3)
    with anyio.fail_after(30):
        for i, rid in enumerate(rids):
            while (await server.call("inspect_result", {"result_id": rid}))["data"] != f"{i}\n":
                await anyio.sleep(0.1)
    server.process.kill()
    await wait_exit(server)
    left = leftovers(sandbox_base)
    assert left.get("runsc list"), "the SIGKILLed server should have left its sandboxes behind"

    server = await start(sandbox_base, state, "--pool-size", "0")
    try:
        # Start-up (before the first answer) reaped the dead server's sandboxes.
        assert leftovers(sandbox_base) == {}
        for i, rid in enumerate(rids):
            r = await server.call("inspect_result", {"result_id": rid})
            assert r["status"] == "error" and "crashed or was killed" in r["error"], r
            assert r["data"] == f"{i}\n"  # what it wrote before the crash is kept
        r = await server.call("inspect_result", {"result_id": done["result_id"]})
        assert r["status"] == "exited" and r["data"] == "finished\n"
        # And it still runs commands.
        assert (await server.call("execute_command", {"command": "true"}))["exit_code"] == 0
    finally:
        await server.process.stdin.aclose()  # type: ignore[union-attr]
        await wait_exit(server)
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--runsc", "/nonexistent/runsc"], "refusing to serve"),
        (["--runsc", "/bin/false"], "refusing to serve"),
        (["--tenant", "nobody"], "nobody"),
        (["--policy", "/nonexistent/policy.yaml"], "policy.yaml"),
    ],
)
async def test_serve_refuses_to_start_with_a_clear_message(sandbox_base, tmp_path, flags, expected):
    r = await anyio.run_process(
        serve_argv(sandbox_base, tmp_path / "state", *flags),
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode != 0
    err = r.stderr.decode()
    assert expected in err, err
    assert r.stdout == b""  # nothing that a client could take for MCP
    assert leftovers(sandbox_base) == {}


async def test_sighup_reloads_the_policy_for_new_calls_and_keeps_it_when_the_file_is_bad(sandbox_base, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    server = await start(sandbox_base, tmp_path / "state", "--policy", str(policy), "--pool-size", "0")
    try:
        r = await server.call_raw("execute_command", {"command": "true", "memory_mb": 1024})
        assert not r.get("isError") and r["structuredContent"]["exit_code"] == 0
        policy.write_text("version: 1\nceilings: {memory: 256MiB}\ndefaults: {memory: 128MiB}\n")
        server.process.send_signal(signal.SIGHUP)
        with anyio.fail_after(30):
            while not (r := await server.call_raw("execute_command", {"command": "true", "memory_mb": 1024})).get(
                "isError"
            ):
                await anyio.sleep(0.1)
        assert "256" in r["content"][0]["text"]  # the new ceiling, named in the denial
        policy.write_text("version: 1\nceilings: {memory: [oops\n")
        server.process.send_signal(signal.SIGHUP)
        await anyio.sleep(1)
        r = await server.call_raw("execute_command", {"command": "true", "memory_mb": 1024})
        assert r.get("isError") and "256" in r["content"][0]["text"]  # the last good policy holds
        r = await server.call_raw("execute_command", {"command": "true", "memory_mb": 200})
        assert not r.get("isError") and r["structuredContent"]["exit_code"] == 0
    finally:
        await server.process.stdin.aclose()  # type: ignore[union-attr]
        await wait_exit(server)
    assert leftovers(sandbox_base) == {}
