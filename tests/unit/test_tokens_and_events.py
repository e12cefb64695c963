"""Tokens file (list, revoke, re-read on change), the bounded event store, and one-line CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mcp_types import JSONRPCNotification, JSONRPCResponse

from gvisor_mcp import events
from gvisor_mcp.auth import TenantTokenVerifier, WatchedTokenFile, authenticate
from gvisor_mcp.tokens import TokenFile, TokenFileError

BIN = Path(sys.executable).with_name("gvisor-mcp")


def test_revoke_by_fingerprint_or_tenant_and_clear_refusals(tmp_path):
    f = TokenFile.load(tmp_path / "t.yaml")
    a1, a2, b = f.add("alice"), f.add("alice"), f.add("bob")
    fps = [e.fingerprint for e in f.entries]
    assert len(fps[0]) == 12 and all(t not in (tmp_path / "t.yaml").read_text() for t in (a1, a2, b))
    with pytest.raises(TokenFileError, match="at least 6 hex"):
        f.revoke("abc")
    with pytest.raises(TokenFileError, match="no token"):
        f.revoke(tenant="carol")
    [gone] = f.revoke(fps[0][:8])
    assert gone.tenant == "alice"
    again = TokenFile.load(tmp_path / "t.yaml")
    assert again.tenant_for(a1) is None and again.tenant_for(a2) == "alice" and again.tenant_for(b) == "bob"
    assert [e.tenant for e in again.revoke(tenant="alice")] == ["alice"]
    assert TokenFile.load(tmp_path / "t.yaml").tenant_for(a2) is None


async def test_a_revoked_token_is_refused_on_the_next_request(tmp_path):
    path = tmp_path / "t.yaml"
    token = TokenFile.load(path).add("alice")
    verifier = TenantTokenVerifier(WatchedTokenFile(path))
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    user = await authenticate(verifier, scope)
    assert not isinstance(user, str) and user.access_token.client_id == "alice"
    TokenFile.load(path).revoke(tenant="alice")  # another process: the CLI
    refused = await authenticate(verifier, scope)
    assert isinstance(refused, str) and "revoked" in refused and token not in refused
    nothing = await authenticate(verifier, {"type": "http", "headers": []})
    assert isinstance(nothing, str) and "Bearer" in nothing


def _note(i: int, size: int = 100) -> JSONRPCNotification:
    return JSONRPCNotification(jsonrpc="2.0", method="notifications/message", params={"i": i, "pad": "x" * size})


async def test_event_store_replays_only_its_own_session_and_stays_bounded():
    store = events.BoundedEventStore(max_session_bytes=4000, max_total_bytes=10_000)
    with events.partition("s1"):
        prime = await store.store_event("1", None)
        ids = [await store.store_event("1", _note(i)) for i in range(3)]
        await store.store_event("2", _note(99))  # another request's stream, same session
        final = await store.store_event("1", JSONRPCResponse(jsonrpc="2.0", id=1, result={}))
    with events.partition("s2"):
        other = await store.store_event("1", _note(7))  # the same stream id in another session
        got: list = []

        async def collect(m):
            got.append(m)

        assert await store.replay_events_after(prime, collect) is None  # s1's event: not for s2
        assert not store.holds(prime) and store.holds(other)
    with events.partition("s1"):
        got = []
        assert await store.replay_events_after(ids[0], collect) == "1"
    assert [m.event_id for m in got] == [ids[1], ids[2], final]
    # Bounds: a session's oldest events go first; the total is bounded too.
    with events.partition("big"):
        for i in range(100):
            await store.store_event("1", _note(i))
        assert store._bytes["big"] <= 4000
    assert store.total_bytes <= 10_000
    store.forget("big")
    assert "big" not in store._bytes


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["token", "lst"], "invalid choice"),
        (["token", "list", "--tokens", "{dir}"], "cannot read the tokens file"),
        (["token", "list", "--tokens", "{bad}"], "not valid YAML"),
        (["serve", "--transport", "http", "--tokens", "{dir}"], "cannot read the tokens file"),
        (
            ["serve", "--transport", "http", "--tokens", "{t}", "--oauth-issuer", "https://id.example"],
            "needs --oauth-jwks-url",
        ),
        (
            [
                "serve",
                "--transport",
                "http",
                "--tokens",
                "{t}",
                "--oauth-issuer",
                "https://id.example",
                "--oauth-jwks-url",
                "http://id.example/jwks",
            ],
            "must be https",
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, argv, expected):
    (tmp_path / "d").mkdir()
    (tmp_path / "bad.yaml").write_text("tokens: [\n")
    subst = {"dir": str(tmp_path / "d"), "bad": str(tmp_path / "bad.yaml"), "t": str(tmp_path / "t.yaml")}
    argv = [a.format(**subst) for a in argv]
    if argv[0] == "serve":
        argv += ["--state-dir", str(tmp_path / "s"), "--state-root", str(tmp_path / "r")]
    r = subprocess.run([str(BIN), *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("gvisor-mcp")]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
