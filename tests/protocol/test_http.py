"""Streamable HTTP with bearer-token tenants: real HTTP on 127.0.0.1, real runsc.

Each test starts `gvisor-mcp serve --transport http` as a subprocess with a
policy of two tenants (alice, bob) and a tokens file made by
`gvisor-mcp token add`, then talks to it with the SDK's streamable HTTP
client and with plain HTTP requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from ..conftest import CGROUP_PARENT, leftovers, workspace_leftovers
from .conftest import BIN, full_receipt

pytestmark = pytest.mark.runsc

POLICY = """\
version: 1
tenants:
  alice:
    quotas: {max_concurrent: 1}
  bob: {}
"""
JSON_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


@dataclass
class HttpServer:
    url: str
    port: int
    tokens: dict[str, str]
    process: subprocess.Popen
    state: Path
    stderr: Path

    def client(self, tenant: str, mode: str = "auto") -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {self.tokens[tenant]}"}, timeout=60)
        return Client(streamable_http_client(self.url, http_client=http), mode=mode)

    def headers(self, tenant: str | None, **extra: str) -> dict[str, str]:
        h = dict(JSON_HEADERS, **extra)
        if tenant:
            h["Authorization"] = f"Bearer {self.tokens[tenant]}"
        return h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token(base: Path, *args: str) -> str:
    r = subprocess.run(
        [str(BIN), "token", "add", *args, "--tokens", str(base / "tokens.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


@contextlib.contextmanager
def running_http_server(
    sandbox_base: Path, tmp_path: Path, *extra: str, policy_text: str = POLICY, port: int | None = None
):
    """`gvisor-mcp serve --transport http` with `extra` flags; on exit: SIGTERM,
    exit status 0, no token in the log, nothing left behind."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    tokens = {
        "alice": _token(tmp_path, "alice", "--policy", str(policy)),
        "bob": _token(tmp_path, "bob", "--policy", str(policy)),
        "metrics": _token(tmp_path, "--metrics"),
    }
    port = port or _free_port()
    stderr = tmp_path / "server.err"
    state = tmp_path / "state"
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
            str(state),
            "--state-root",
            str(sandbox_base),
            "--cgroup-parent",
            CGROUP_PARENT,
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("wb"),
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "INFO"},
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None, stderr.read_text()
            import time

            time.sleep(0.1)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", port, tokens, process, state, stderr)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = stderr.read_text()
        for token in tokens.values():  # never in a log line
            assert token not in log
        assert leftovers(sandbox_base) == {}
        assert workspace_leftovers(sandbox_base, state) == []


@pytest.fixture
def http_server(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path) as server:
        yield server


async def test_no_token_or_a_wrong_token_gets_401_and_nothing_else(http_server):
    async with httpx2.AsyncClient(timeout=60) as http:
        for headers in (
            http_server.headers(None),
            http_server.headers(None, Authorization="Bearer gmcp_not-a-real-token"),
            http_server.headers(None, Authorization=f"Basic {http_server.tokens['alice']}"),
        ):
            for body in (INIT, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}):
                r = await http.post(http_server.url, json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
                assert "execute_command" not in r.text and "token add" in r.json()["message"]
        r = await http.get(http_server.url.replace("/mcp", "/metrics"))
        assert r.status_code == 401


async def test_host_origin_body_size_and_metrics_access(http_server):
    async with httpx2.AsyncClient(timeout=60) as http:
        r = await http.post(http_server.url, json=INIT, headers=http_server.headers("alice", Host="evil.example"))
        assert r.status_code == 421
        r = await http.post(
            http_server.url, json=INIT, headers=http_server.headers("alice", Origin="https://evil.example")
        )
        assert r.status_code == 403
        big = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "execute_command", "arguments": {"command": "x" * (5 * 1024 * 1024)}},
        }
        r = await http.post(http_server.url, json=big, headers=http_server.headers("alice"))
        assert r.status_code == 413
        metrics_url = http_server.url.replace("/mcp", "/metrics")
        r = await http.get(metrics_url, headers=http_server.headers("alice"))
        assert r.status_code == 403  # a tenant token does not read the metrics
        r = await http.post(http_server.url, json=INIT, headers=http_server.headers("metrics"))
        assert r.status_code == 403  # a metrics token does not call tools
    # The legitimate Origin (the server's own) is fine.
    async with httpx2.AsyncClient(timeout=60) as http:
        r = await http.post(
            http_server.url,
            json=INIT,
            headers=http_server.headers("alice", Origin=f"http://127.0.0.1:{http_server.port}"),
        )
        assert r.status_code == 200


async def test_sessions_are_long_random_and_bound_to_their_tenant(http_server):
    async with httpx2.AsyncClient(timeout=60) as http:
        r = await http.post(http_server.url, json=INIT, headers=http_server.headers("alice"))
        assert r.status_code == 200
        sid = r.headers["mcp-session-id"]
        assert len(sid) == 64 and int(sid, 16) >= 0  # 256 random bits
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        ok = await http.post(
            http_server.url,
            json=listing,
            headers=http_server.headers("alice", **{"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}),
        )
        assert ok.status_code == 200 and "execute_command" in ok.text
        stolen = await http.post(
            http_server.url,
            json=listing,
            headers=http_server.headers("bob", **{"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}),
        )
        unknown = await http.post(
            http_server.url,
            json=listing,
            headers=http_server.headers("bob", **{"mcp-session-id": "ab" * 32, "mcp-protocol-version": "2025-06-18"}),
        )
        assert stolen.status_code == unknown.status_code == 404
        assert stolen.json() == unknown.json()
        assert "execute_command" not in stolen.text


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_two_tenants_see_only_their_own(http_server, mode):
    async with http_server.client("alice", mode) as a, http_server.client("bob", mode) as b:
        # Sessionless (2026-07-28): a call has a workspace only when it names one it created.
        ws: dict[str, dict] = {"alice": {}, "bob": {}}
        if mode == "auto":
            for name, c in (("alice", a), ("bob", b)):
                created = (await c.call_tool("create_workspace", {})).structured_content
                ws[name] = {"workspace": created["workspace"]}
        async with anyio.create_task_group() as tg:
            results: dict[str, dict] = {}

            async def call(name: str, c: Client) -> None:
                r = await c.call_tool(
                    "execute_command",
                    {"command": f"echo {name} > /workspace/mine && cat /workspace/mine; sleep 1", **ws[name]},
                )
                results[name] = r.structured_content

            tg.start_soon(call, "alice", a)
            tg.start_soon(call, "bob", b)
        assert results["alice"]["stdout"] == "alice\n" and results["bob"]["stdout"] == "bob\n"
        assert (await full_receipt(a, results["alice"]["result_id"]))["tenant"] == "alice"
        # Results: each inspects its own; the other's id is "not found", like a random one.
        rid = results["alice"]["result_id"]
        assert (await a.call_tool("inspect_result", {"result_id": rid})).structured_content["data"] == "alice\n"
        theirs = await b.call_tool("inspect_result", {"result_id": rid})
        random = await b.call_tool("inspect_result", {"result_id": "res_" + "0" * 32})
        assert theirs.is_error and random.is_error
        assert theirs.content[0].text.replace(rid, "X") == random.content[0].text.replace("res_" + "0" * 32, "X")
        assert (await b.call_tool("cancel_command", {"result_id": rid})).is_error
        # Workspaces: bob's is his own.
        r = await b.call_tool("execute_command", {"command": "cat /workspace/mine", **ws["bob"]})
        assert r.structured_content["stdout"] == "bob\n"
        # Active lists: alice's background command is not in bob's list.
        bg = (await a.call_tool("execute_command", {"command": "sleep 60", "background": True})).structured_content
        assert [c["result_id"] for c in (await a.call_tool("list_active", {})).structured_content["commands"]] == [
            bg["result_id"]
        ]
        assert (await b.call_tool("list_active", {})).structured_content["commands"] == []
        assert (await b.call_tool("cancel_command", {"result_id": bg["result_id"]})).is_error
        assert (await a.call_tool("cancel_command", {"result_id": bg["result_id"]})).structured_content[
            "status"
        ] == "killed"


async def test_quota_is_a_clear_error_and_does_not_hold_up_another_tenant(http_server):
    async with http_server.client("alice") as a, http_server.client("bob") as b:
        first = (await a.call_tool("execute_command", {"command": "sleep 60", "background": True})).structured_content
        over = await a.call_tool("execute_command", {"command": "echo second"})
        assert over.is_error and "quota" in over.content[0].text and "max_concurrent=1" in over.content[0].text
        r = await b.call_tool("execute_command", {"command": "echo bob runs"})
        assert not r.is_error and r.structured_content["stdout"] == "bob runs\n"
        await a.call_tool("cancel_command", {"result_id": first["result_id"]})
    async with httpx2.AsyncClient(timeout=60) as http:
        text = (
            await http.get(http_server.url.replace("/mcp", "/metrics"), headers=http_server.headers("metrics"))
        ).text
    samples = _samples(text)
    assert samples[("gvisor_mcp_denials_total", (("kind", "quota"), ("tenant", "alice")))] == 1
    assert samples[("gvisor_mcp_calls_total", (("status", "exited"), ("tenant", "bob")))] == 1
    assert samples[("gvisor_mcp_calls_total", (("status", "killed"), ("tenant", "alice")))] == 1
    assert samples[("gvisor_mcp_run_seconds_count", (("tenant", "bob"),))] == 1
    # Audit: tokens never in it; the tenant is.
    audit = (http_server.state / "audit.jsonl").read_text()
    assert all(t not in audit for t in http_server.tokens.values())
    assert {json.loads(x)["tenant"] for x in audit.splitlines()} == {"alice", "bob"}


def _samples(text: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--host", "0.0.0.0"], "without TLS"),
        (["--tls-cert", "/nonexistent.pem"], "go together"),
    ],
)
def test_unsafe_http_configurations_refuse_to_start(sandbox_base, tmp_path, flags, expected):
    r = subprocess.run(
        [
            str(BIN),
            "serve",
            "--transport",
            "http",
            "--tokens",
            str(tmp_path / "t.yaml"),
            "--state-root",
            str(sandbox_base),
            "--state-dir",
            str(tmp_path / "s"),
            *flags,
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2 and expected in r.stderr and r.stdout == ""
    assert leftovers(sandbox_base) == {}


def test_token_add_stores_only_a_hash(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    token = _token(tmp_path, "alice", "--policy", str(policy))
    stored = (tmp_path / "tokens.yaml").read_text()
    assert token.startswith("gmcp_") and len(token) > 40 and token not in stored
    assert oct((tmp_path / "tokens.yaml").stat().st_mode & 0o777) == "0o600"
    r = subprocess.run(
        [str(BIN), "token", "add", "mallory", "--policy", str(policy), "--tokens", str(tmp_path / "tokens.yaml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "mallory" in r.stderr and r.stdout == ""


async def test_a_sessions_workspace_goes_when_the_session_ends(http_server):
    sessions = http_server.state / "workspaces" / "alice" / "sessions"
    async with http_server.client("alice", "legacy") as a:
        r = await a.call_tool("execute_command", {"command": "echo kept > /workspace/f && cat /workspace/f"})
        assert r.structured_content["stdout"] == "kept\n"
        [session] = [p for p in sessions.iterdir() if not p.name.startswith(".")]
        assert session.is_dir()
    # The client's DELETE ended the session: its workspace is unmounted and gone.
    with anyio.fail_after(30):
        while session.exists():
            await anyio.sleep(0.1)
