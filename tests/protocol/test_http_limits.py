"""Limits of the HTTP front (issue 14, findings 4, 5, 8, and promises that had
no test): slow and idle connections, the connection cap, session caps, idle
session expiry freeing the workspace, workspace caps, SIGHUP reloading the
tokens file, --allowed-host / --allowed-origin, the slow-body limit.

Real `gvisor-mcp serve --transport http` on 127.0.0.1, real runsc.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import anyio
import httpx2
import pytest

from ..conftest import workspace_leftovers
from .conftest import BIN
from .test_http import INIT, running_http_server

pytestmark = pytest.mark.runsc

PROTOCOL = {"mcp-protocol-version": "2025-06-18"}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, at_most: int) -> int:
    """Wait until the server holds at most `at_most` fds (sockets close asynchronously)."""
    with anyio.fail_after(60):
        while (n := fds(pid)) > at_most:
            await anyio.sleep(0.1)
    return n


async def open_session(http: httpx2.AsyncClient, server, tenant: str) -> httpx2.Response:
    return await http.post(server.url, json=INIT, headers=server.headers(tenant))


def raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    return s


async def closed_by_server(s: socket.socket) -> bool:
    """Whether the server has closed `s` (EOF or reset); never blocks."""
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 4")


async def test_slow_header_senders_are_dropped_and_fds_return_while_a_normal_client_works(sandbox_base, tmp_path):
    """200 clients send their request head a byte every 0.2 s (the whole head
    would take ~3 minutes). The server closes each once its 2 s header
    timeout has run out — while it is still sending — its fds come back to
    where they were, and a normal client is served throughout."""
    with running_http_server(sandbox_base, tmp_path, "--header-timeout", "2", "--pool-size", "0") as server:
        pid = server.process.pid
        async with httpx2.AsyncClient(timeout=60) as http:
            assert (await open_session(http, server, "alice")).status_code == 200
        baseline = await settled_fds(pid, 10**6)
        head = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + b"x" * 900 + b"\r\n\r\n"
        slow = [raw_connect(server.port) for _ in range(200)]
        closed: set[int] = set()

        async def drip(i: int, s: socket.socket) -> None:
            for byte in head:
                if await closed_by_server(s):
                    closed.add(i)
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    closed.add(i)
                    return
                await anyio.sleep(0.2)

        try:
            async with anyio.create_task_group() as tg:
                for i, s in enumerate(slow):
                    tg.start_soon(drip, i, s)
                await anyio.sleep(0.5)
                assert fds(pid) > baseline + 100  # they are really open on the server
                async with httpx2.AsyncClient(timeout=60) as http:  # a normal client, meanwhile
                    r = await open_session(http, server, "bob")
                    assert r.status_code == 200 and "gvisor-mcp" in r.text
                with anyio.fail_after(120):
                    while len(closed) < len(slow):
                        await anyio.sleep(0.2)
                tg.cancel_scope.cancel()
        finally:
            for s in slow:
                s.close()
        assert len(closed) == 200  # each closed by the server while it was still sending its head
        await settled_fds(pid, baseline)


async def test_connections_past_the_cap_wait_outside_the_server_and_idle_ones_are_closed(sandbox_base, tmp_path):
    with running_http_server(
        sandbox_base, tmp_path, "--max-connections", "10", "--header-timeout", "2", "--pool-size", "0"
    ) as server:
        pid = server.process.pid
        async with httpx2.AsyncClient(timeout=60) as http:
            assert (await open_session(http, server, "alice")).status_code == 200
        baseline = await settled_fds(pid, 10**6)
        silent = [raw_connect(server.port) for _ in range(40)]  # connect, send nothing
        try:
            await anyio.sleep(1)
            assert fds(pid) <= baseline + 10  # the rest wait in the listen backlog: no fd, no task
            with anyio.fail_after(120):  # each batch is closed at its header timeout, the next accepted
                while not all([await closed_by_server(s) for s in silent]):
                    await anyio.sleep(0.2)
        finally:
            for s in silent:
                s.close()
        await settled_fds(pid, baseline)
        # A kept-alive connection that goes idle after a response is closed too.
        s = socket.create_connection(("127.0.0.1", server.port))
        token = server.tokens["alice"].encode()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token + b"\r\n\r\n")
        s.settimeout(60)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 403")  # answered, connection kept alive
        rest = b""
        while chunk := s.recv(65536):  # then EOF: closed after the idle limit
            rest += chunk
        s.close()
        async with httpx2.AsyncClient(timeout=60) as http:
            assert (await open_session(http, server, "bob")).status_code == 200


async def test_session_caps_per_tenant_and_per_server_give_clear_errors(sandbox_base, tmp_path):
    with running_http_server(
        sandbox_base, tmp_path, "--max-sessions-per-tenant", "2", "--max-sessions", "3", "--pool-size", "0"
    ) as server:
        async with httpx2.AsyncClient(timeout=60) as http:
            a1, a2 = [await open_session(http, server, "alice") for _ in range(2)]
            assert a1.status_code == a2.status_code == 200
            over = await open_session(http, server, "alice")
            assert over.status_code == 429
            message = over.json()["error"]["message"]
            assert "--max-sessions-per-tenant 2" in message and "DELETE" in message
            assert (await open_session(http, server, "bob")).status_code == 200
            full = await open_session(http, server, "bob")
            assert full.status_code == 503 and "--max-sessions 3" in full.json()["error"]["message"]
            # Ending one of alice's frees a place for her.
            sid = a1.headers["mcp-session-id"]
            r = await http.delete(server.url, headers=server.headers("alice", **{"mcp-session-id": sid}, **PROTOCOL))
            assert r.status_code == 200
            assert (await open_session(http, server, "alice")).status_code == 200


async def test_an_idle_session_expires_and_its_workspace_is_freed(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path, "--session-idle-timeout", "3", "--pool-size", "0") as server:
        sessions = server.state / "workspaces" / "alice" / "sessions"
        async with httpx2.AsyncClient(timeout=60) as http:
            sid = (await open_session(http, server, "alice")).headers["mcp-session-id"]
            h = server.headers("alice", **{"mcp-session-id": sid}, **PROTOCOL)
            await http.post(server.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=h)
            r = await http.post(
                server.url,
                headers=h,
                json={
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "execute_command", "arguments": {"command": "echo x > /workspace/f"}},
                },
            )
            assert r.status_code == 200 and '"exit_code":0' in r.text.replace(" ", "")
            assert [p for p in sessions.iterdir()]  # its workspace exists
            assert workspace_leftovers(server.state, wait=0)  # mounted: one loop device
            # No request from here on: the session expires, its workspace goes.
            with anyio.fail_after(120):
                while list(sessions.iterdir()) or workspace_leftovers(server.state, wait=0):
                    await anyio.sleep(0.2)
            gone = await http.post(server.url, headers=h, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
            assert gone.status_code == 404


async def test_workspace_caps_refuse_a_new_mount_with_what_to_do(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path, "--max-workspaces-per-tenant", "1", "--pool-size", "0") as server:
        async with server.client("alice", "legacy") as a1:
            r = await a1.call_tool("execute_command", {"command": "echo one"})
            assert not r.is_error
            async with server.client("alice", "legacy") as a2:
                r = await a2.call_tool("execute_command", {"command": "echo two"})
                assert r.is_error
                text = r.content[0].text
                assert "--max-workspaces-per-tenant 1" in text and "End a session" in text
                async with server.client("bob", "legacy") as b:  # another tenant is not held up
                    assert not (await b.call_tool("execute_command", {"command": "true"})).is_error
        # Both of alice's sessions ended (DELETE): a new one gets its workspace.
        async with server.client("alice", "legacy") as a3:
            assert not (await a3.call_tool("execute_command", {"command": "echo three"})).is_error


async def test_the_tokens_file_is_reread_when_it_changes_and_kept_when_broken(sandbox_base, tmp_path):
    """A token added (or revoked) while the server runs counts from the next
    request, without SIGHUP (auth.py); SIGHUP still re-reads the file. A
    broken file is logged and the last good tokens hold."""
    with running_http_server(sandbox_base, tmp_path, "--pool-size", "0") as server:
        tokens_file = tmp_path / "tokens.yaml"
        old_alice = server.tokens["alice"]
        r = subprocess.run(
            [
                str(BIN),
                "token",
                "add",
                "alice",
                "--policy",
                str(tmp_path / "policy.yaml"),
                "--tokens",
                str(tokens_file),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        new_alice = r.stdout.strip()
        async with httpx2.AsyncClient(timeout=60) as http:

            def with_token(token: str) -> dict:
                return {**server.headers(None), "Authorization": f"Bearer {token}"}

            assert (await http.post(server.url, json=INIT, headers=with_token(new_alice))).status_code == 200
            assert (await http.post(server.url, json=INIT, headers=with_token(old_alice))).status_code == 200
            # A broken file: the reload fails (logged), the last good tokens hold.
            tokens_file.write_text("tokens: [oops\n")
            assert (await http.post(server.url, json=INIT, headers=with_token(new_alice))).status_code == 200
            server.process.send_signal(signal.SIGHUP)
            with anyio.fail_after(30):
                while server.stderr.read_text().count("tokens_reload_failed") < 2:
                    await anyio.sleep(0.1)
            assert (await http.post(server.url, json=INIT, headers=with_token(new_alice))).status_code == 200
        server.tokens["new_alice"] = new_alice  # checked absent from the log at the end


async def test_allowed_host_and_allowed_origin_extend_the_defaults_and_nothing_else(sandbox_base, tmp_path):
    with running_http_server(
        sandbox_base,
        tmp_path,
        "--allowed-host",
        "gw.example:8443",
        "--allowed-origin",
        "https://app.example",
        "--pool-size",
        "0",
    ) as server:
        async with httpx2.AsyncClient(timeout=60) as http:
            ok_host = await http.post(server.url, json=INIT, headers=server.headers("alice", Host="gw.example:8443"))
            assert ok_host.status_code == 200
            bad_host = await http.post(server.url, json=INIT, headers=server.headers("alice", Host="gw.example:9999"))
            assert bad_host.status_code == 421
            ok_origin = await http.post(
                server.url, json=INIT, headers=server.headers("alice", Origin="https://app.example")
            )
            assert ok_origin.status_code == 200
            bad_origin = await http.post(
                server.url, json=INIT, headers=server.headers("alice", Origin="https://evil.example")
            )
            assert bad_origin.status_code == 403


async def test_a_body_that_does_not_arrive_in_time_is_dropped(sandbox_base, tmp_path):
    """Head complete, body promised (Content-Length) but trickling: dropped
    at the body timeout, while the client is still sending; others are served."""
    with running_http_server(sandbox_base, tmp_path, "--body-timeout", "2", "--pool-size", "0") as server:
        s = raw_connect(server.port)
        token = server.tokens["alice"].encode()
        s.sendall(
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:"
            + str(server.port).encode()
            + b"\r\nAuthorization: Bearer "
            + token
            + b"\r\nAccept: application/json, text/event-stream\r\nContent-Type: application/json"
            + b"\r\nContent-Length: 1000\r\n\r\n{"
        )
        dropped = False
        try:
            for _ in range(300):  # one byte every 0.2 s: the body would take 200 s
                if await closed_by_server(s):
                    dropped = True
                    break
                try:
                    s.send(b" ")
                except OSError:
                    dropped = True
                    break
                await anyio.sleep(0.2)
        finally:
            s.close()
        assert dropped, "the server kept waiting for the body"
        async with httpx2.AsyncClient(timeout=60) as http:
            assert (await open_session(http, server, "bob")).status_code == 200
