"""Raw JSON-RPC lines at the edge of stdio (issue 14, finding 10): ids that
are not strings or integers, over-long progress tokens, a 50 MB message.

Raw lines, because the SDK's client never sends these.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from ..conftest import leftovers
from .test_lifecycle import RawServer, start, wait_exit

pytestmark = pytest.mark.runsc


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def answer_for(server: RawServer, request_id) -> dict:
    with anyio.fail_after(60):
        while True:
            msg = await server.receive()
            if "id" in msg and msg.get("id") == request_id and ("result" in msg or "error" in msg):
                return msg


async def ping(server: RawServer, request_id: int) -> None:
    await server.send({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
    assert "result" in await answer_for(server, request_id)


@pytest.fixture
async def server(sandbox_base, tmp_path):
    s = await start(sandbox_base, tmp_path / "state", "--pool-size", "0")
    yield s
    await s.process.stdin.aclose()  # type: ignore[union-attr]
    await wait_exit(s)
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("bad_id", [{"a": 1}, [1], 1.5, True, None])
async def test_a_request_whose_id_is_not_a_string_or_integer_gets_an_error(server, bad_id):
    await server.send({"jsonrpc": "2.0", "id": bad_id, "method": "tools/list"})
    got = await answer_for(server, None)
    assert got["error"]["code"] == -32600
    assert '"id"' in got["error"]["message"] and "string or an integer" in got["error"]["message"]
    await ping(server, 7)  # and it goes on serving


async def test_a_huge_progress_token_is_refused_and_never_echoed(server):
    token = "t" * (1024 * 1024)
    await server.send(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {
                "name": "execute_command",
                "arguments": {"command": "sleep 2; echo done"},
                "_meta": {"progressToken": token},
            },
        }
    )
    got = await answer_for(server, 5)
    assert got["error"]["code"] == -32602
    assert "progressToken" in got["error"]["message"] and "256" in got["error"]["message"]
    assert token not in json.dumps(got)
    # A short token gets its progress notifications (the command runs > 1 s).
    await server.send(
        {
            "jsonrpc": "2.0",
            "id": 6,
            "method": "tools/call",
            "params": {
                "name": "execute_command",
                "arguments": {"command": "sleep 2.5; echo done"},
                "_meta": {"progressToken": "p-6"},
            },
        }
    )
    seen = []
    with anyio.fail_after(60):
        while True:
            msg = await server.receive()
            if msg.get("method") == "notifications/progress":
                seen.append(msg["params"]["progressToken"])
            if msg.get("id") == 6:
                break
    assert msg["result"]["structuredContent"]["stdout"] == "done\n"
    assert seen and set(seen) == {"p-6"}


@pytest.mark.parametrize("megabytes", [50, 30])
async def test_a_huge_message_does_not_swell_the_server(server, megabytes):
    """50 MB is past the 32 MiB line limit: refused while it arrives, never
    held whole. 30 MB is parsed — once — and refused by the policy (argv
    limit). Before: ~200 MiB more resident memory after a 50 MB line."""
    pid = server.process.pid
    await ping(server, 1)
    before = rss(pid)
    line = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "execute_command", "arguments": {"command": "echo " + "x" * (megabytes * 1000 * 1000)}},
        }
    )
    await server.process.stdin.send(line.encode() + b"\n")  # type: ignore[union-attr]
    got = await answer_for(server, 2)
    assert "error" in got or got["result"].get("isError"), str(got)[:500]
    await ping(server, 3)
    grown = rss(pid) - before
    assert grown < 80 * 1024 * 1024, f"resident memory grew by {grown / 2**20:.0f} MiB"
