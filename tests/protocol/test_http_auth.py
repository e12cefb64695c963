"""HTTP auth, sessions and resumable streams, against the real server on 127.0.0.1.

- OAuth resource-server mode: a key pair made here, its JWKS served by a
  plain `python -m http.server` on 127.0.0.1 (the issuer itself is never
  contacted: a resource server only needs its keys). Valid, expired, wrong
  audience, wrong issuer, wrong key, unknown tenant and malformed tokens.
- `token list` / `token revoke`, and a revoked token refused inside its session.
- Only an initialize opens a session; the progressToken bound of stdio.
- A real SDK client whose connection drops mid-call gets the result by
  resuming with Last-Event-ID (a TCP proxy here cuts the first stream).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time

import anyio
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from .conftest import BIN
from .test_http import INIT, _free_port, running_http_server

pytestmark = pytest.mark.runsc

ISSUER = "https://id.example.test"
V = {"mcp-protocol-version": "2025-11-25"}
INIT_NEW = {**INIT, "params": {**INIT["params"], "protocolVersion": "2025-11-25"}}


@contextlib.contextmanager
def jwks_server(tmp_path, *keys):
    d = tmp_path / "jwks"
    d.mkdir()
    jwks = {
        "keys": [
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())),
                "kid": f"k{i}",
                "use": "sig",
                "alg": "RS256",
            }
            for i, k in enumerate(keys)
        ]
    }
    (d / "jwks.json").write_text(json.dumps(jwks))
    port = _free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        p.terminate()
        p.wait(timeout=10)


def _jwt(key, kid="k0", **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "user-1", "iat": now, "exp": now + 600, "org": "alice", **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def test_oauth_resource_server_mode(sandbox_base, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    port = _free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    with (
        jwks_server(tmp_path, key) as jwks_url,
        running_http_server(
            sandbox_base,
            tmp_path,
            "--oauth-issuer",
            ISSUER,
            "--oauth-jwks-url",
            jwks_url,
            "--oauth-tenant-claim",
            "org",
            port=port,
        ) as server,
    ):
        async with httpx2.AsyncClient(timeout=60) as http:
            # RFC 9728 metadata: public, names the issuer; every 401 points to it.
            meta = await http.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp")
            assert meta.status_code == 200
            assert meta.json()["resource"] == resource and meta.json()["authorization_servers"] == [ISSUER]
            r = await http.post(server.url, json=INIT, headers=server.headers(None))
            assert r.status_code == 401
            assert (
                f'resource_metadata="http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"'
                in r.headers["www-authenticate"]
            )

            async def refused(token: str, status: int = 401) -> str:
                r = await http.post(
                    server.url, json=INIT, headers=server.headers(None, Authorization=f"Bearer {token}")
                )
                assert r.status_code == status, r.text
                if status == 401:
                    assert 'error="invalid_token"' in r.headers["www-authenticate"]
                message = r.json()["message"]
                assert "\n" not in message and "Traceback" not in message
                return message

            now = int(time.time())
            assert "expired" in await refused(_jwt(key, aud=resource, exp=now - 3600, iat=now - 7200))
            assert "audience" in await refused(_jwt(key, aud="https://other.example/mcp"))
            assert "no `aud` claim" in await refused(_jwt(key))
            assert "issued by" in await refused(_jwt(key, iss="https://evil.example", aud=resource))
            assert "signature" in await refused(_jwt(stranger, aud=resource))
            assert "not a well-formed JWT" in await refused("abc.def.ghi")
            es = jwt.encode(
                {"iss": ISSUER, "aud": resource, "exp": now + 600, "org": "alice"},
                ec.generate_private_key(ec.SECP256R1()),
                algorithm="ES256",
                headers={"kid": "k0"},
            )
            assert "does not match its key" in await refused(es)
            assert "algorithm 'HS256' is not accepted" in await refused(
                jwt.encode(
                    {"iss": ISSUER, "aud": resource, "exp": now + 600, "org": "alice"},
                    "k" * 32,
                    algorithm="HS256",
                    headers={"kid": "k0"},
                )
            )
            assert "org" in await refused(_jwt(key, aud=resource, org=None))
            assert "not in the policy" in await refused(_jwt(key, aud=resource, org="mallory"), status=403)

        # A valid token: a real client session, tenant alice from the claim.
        good = _jwt(key, aud=resource)
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {good}"}, timeout=60)
        async with Client(streamable_http_client(server.url, http_client=http), mode="legacy") as c:
            r = await c.call_tool("execute_command", {"command": "echo via-oauth"})
            assert r.structured_content["stdout"] == "via-oauth\n"
        # Static tokens keep working next to OAuth.
        async with server.client("bob", "legacy") as c:
            assert (await c.call_tool("execute_command", {"command": "echo static"})).structured_content[
                "stdout"
            ] == "static\n"
    assert "Traceback" not in server.stderr.read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=60)


async def test_token_list_revoke_sessions_and_progress_token(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path, "--max-sessions-per-tenant", "2") as server:
        tokens_file = str(tmp_path / "tokens.yaml")
        listed = _cli("token", "list", "--tokens", tokens_file)
        assert listed.returncode == 0 and all(t not in listed.stdout for t in server.tokens.values())
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert sorted(r[0] for r in rows) == ["@metrics", "alice", "bob"]
        async with httpx2.AsyncClient(timeout=60) as http:
            # Requests without a session never open one: with a cap of 2, after
            # many such requests two initializes still succeed.
            for _ in range(4):
                g = await http.get(server.url, headers=server.headers("alice", **V))
                assert g.status_code == 400 and "initialize" in g.json()["error"]["message"]
                assert "mcp-session-id" not in g.headers
                d = await http.delete(server.url, headers=server.headers("alice", **V))
                assert d.status_code == 400
                p = await http.post(
                    server.url,
                    json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"},
                    headers=server.headers("alice", **V),
                )
                assert p.status_code >= 400 and "mcp-session-id" not in p.headers
            sids = []
            for _ in range(2):
                r = await http.post(server.url, json=INIT_NEW, headers=server.headers("alice"))
                assert r.status_code == 200
                sids.append(r.headers["mcp-session-id"])
            # The progressToken bound of stdio holds over HTTP too.
            call = {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {
                    "name": "execute_command",
                    "arguments": {"command": "true"},
                    "_meta": {"progressToken": "p" * 300},
                },
            }
            h = server.headers("alice", **V, **{"mcp-session-id": sids[0]})
            r = await http.post(server.url, json=call, headers=h)
            assert r.json()["error"]["code"] == -32602 and "256" in r.json()["error"]["message"]
            # Revoke alice's token: the next request of her open session is refused.
            ok = await http.post(server.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=h)
            assert ok.status_code == 200
            fp = next(r[2] for r in rows if r[0] == "alice")
            rv = _cli("token", "revoke", fp[:8], "--tokens", tokens_file)
            assert rv.returncode == 0 and fp in rv.stdout
            r = await http.post(server.url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=h)
            assert r.status_code == 401 and "revoked" in r.json()["message"]
            assert "alice" not in _cli("token", "list", "--tokens", tokens_file).stdout


DROPPED = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
"""How a proxied connection ends when one side goes away."""


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the first connection whose response
    stream has carried an SSE event id after a tools/call went up it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut = 0
        self.resumed = 0

    async def serve(self, listener) -> None:
        await listener.serve(self.handle)

    async def handle(self, client) -> None:
        with contextlib.suppress(*DROPPED):
            async with client, await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream:
                await self._pipe(client, upstream)

    async def _pipe(self, client, upstream) -> None:
        state = {"call": False}

        # Either side may reset its connection (the client does when the line is cut): that
        # ends this connection, inside each task, since contextlib.suppress in handle() does
        # not look into the task group's ExceptionGroup on Python 3.11.
        async def up() -> None:
            with contextlib.suppress(*DROPPED):
                async for chunk in client:
                    if b"tools/call" in chunk:
                        state["call"] = True
                    if b"last-event-id" in chunk.lower():
                        self.resumed += 1
                    await upstream.send(chunk)
            tg.cancel_scope.cancel()

        async def down() -> None:
            with contextlib.suppress(*DROPPED):
                async for chunk in upstream:
                    await client.send(chunk)
                    if state["call"] and not self.cut and b"\r\nid: " in chunk:  # an SSE event (not mcp-session-id:)
                        # The priming event has reached the client: let it be read, then drop the line.
                        self.cut += 1
                        await anyio.sleep(0.5)
                        tg.cancel_scope.cancel()
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(up)
            tg.start_soon(down)


async def test_a_client_whose_stream_drops_mid_call_resumes_with_last_event_id(sandbox_base, tmp_path):
    with running_http_server(sandbox_base, tmp_path) as server:
        proxy = CuttingProxy(server.port)
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
            tg.start_soon(proxy.serve, listener)
            proxy_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            http = httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {server.tokens['alice']}", "Host": f"127.0.0.1:{server.port}"},
                timeout=120,
            )
            url = f"http://127.0.0.1:{proxy_port}/mcp"
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as c:
                r = await c.call_tool("execute_command", {"command": "sleep 3; echo finished"})
                assert r.structured_content["stdout"] == "finished\n", r
            tg.cancel_scope.cancel()
    assert proxy.cut == 1 and proxy.resumed >= 1
