"""Fair share over real HTTP: a tenant holding its whole quota never holds every slot.

Issue 14, finding 7: `--max-concurrent 4`, tenant a's quota 4: a's long
commands took all four slots and b's `true` waited for one of them to END.
Now admission keeps a slot for a tenant below its fair share: b's call runs
while all of a's commands are still running. (No timing: the bound is that
b's call returns at all while a's `sleep 300`s go on. Latency figures are in
benchmarks/bench_fair.py.) `serve` also warns about that configuration.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import anyio
import pytest

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import BIN
from .test_http import HttpServer, _free_port, _token

pytestmark = pytest.mark.runsc

POLICY = """version: 1
quotas: {max_concurrent: 4}
tenants:
  a: {}
  b: {}
"""


@pytest.fixture
def fair_server(sandbox_base, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    tokens = {t: _token(tmp_path, t, "--policy", str(policy)) for t in ("a", "b")}
    port = _free_port()
    stderr = tmp_path / "server.err"
    process = subprocess.Popen(
        [
            str(BIN),
            "serve",
            "--transport",
            "http",
            "--port",
            str(port),
            "--policy",
            str(policy),
            "--tokens",
            str(tmp_path / "tokens.yaml"),
            "--state-dir",
            str(tmp_path / "state"),
            "--state-root",
            str(sandbox_base),
            "--cgroup-parent",
            CGROUP_PARENT,
            "--max-concurrent",
            "4",
            "--pool-size",
            "0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("wb"),
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "INFO"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", port, tokens, process, tmp_path / "state", stderr)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert leftovers(sandbox_base) == {}


async def running(client) -> list[dict]:
    return (await client.call_tool("list_active", {})).structured_content["commands"]


async def test_a_tenant_at_its_quota_leaves_a_slot_for_another(fair_server):
    log = fair_server.stderr.read_text()
    # serve warned about this very configuration at start
    assert "capacity_warning" in log and "quotas.max_concurrent=4 is at least the server's capacity" in log
    async with fair_server.client("a") as a, fair_server.client("b") as b:
        ids = []
        for _ in range(4):
            r = await a.call_tool("execute_command", {"command": "sleep 300", "background": True})
            ids.append(r.structured_content["result_id"])
        with anyio.fail_after(120):
            while sum(1 for c in await running(a) if c["container_id"]) < 3:
                await anyio.sleep(0.2)
        mine = await running(a)
        assert sorted(c["result_id"] for c in mine) == sorted(ids)
        assert sum(1 for c in mine if c["container_id"]) == 3  # the 4th waits: one slot is kept
        with anyio.fail_after(120):  # generous: it must not wait for a's 300 s commands
            r = await b.call_tool("execute_command", {"command": "echo b-ran"})
        assert r.structured_content["stdout"] == "b-ran\n", r
        assert len(await running(a)) == 4  # all of a's commands were still going
        for rid in ids:
            await a.call_tool("cancel_command", {"result_id": rid})
