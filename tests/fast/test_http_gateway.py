"""The HTTP front (http.Gateway) in-process: tokens (401/403), Host and Origin
(421/403), body size (413), sessions bound to their tenant, tenants apart."""

from __future__ import annotations

import pytest

from .conftest import structured, text

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
V = {"mcp-protocol-version": "2025-06-18"}


async def test_no_token_or_a_wrong_token_gets_401_and_nothing_else(fast):
    async with fast(shared=True) as srv, srv.gateway() as gw:
        for auth in (None, "Bearer gmcp_not-a-real-token", f"Basic {gw.tokens['alice']}", "Bearer "):
            headers = gw.headers(None, **({"Authorization": auth} if auth else {}))
            for body in (INIT, LIST):
                r = await gw.http.post(gw.url, json=body, headers=headers)
                assert r.status_code == 401, auth
                assert r.headers["www-authenticate"].startswith('Bearer realm="gvisor-mcp"')  # + RFC 6750 error, if any
                assert "token add" in r.json()["message"] and "execute_command" not in r.text
        assert (await gw.http.get("/metrics")).status_code == 401
        assert gw.gateway.hosts == {}  # nothing was started for anyone


async def test_metrics_and_mcp_need_the_right_kind_of_token(fast):
    async with fast(shared=True) as srv, srv.gateway() as gw:
        r = await gw.http.get("/metrics", headers=gw.headers("alice"))
        assert r.status_code == 403 and "metrics token" in r.json()["message"]
        r = await gw.http.get("/metrics", headers=gw.headers("metrics"))
        assert r.status_code == 200 and "gvisor_mcp_" in r.text
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("metrics"))
        assert r.status_code == 403 and "cannot call tools" in r.json()["message"]
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("mallory"))
        assert r.status_code == 403 and "'mallory'" in r.json()["message"] and "not in the policy" in r.text
        r = await gw.http.post("/other", json=INIT, headers=gw.headers("alice"))
        assert r.status_code == 404 and "/mcp" in r.json()["message"]


async def test_host_origin_and_body_size_are_checked(fast):
    async with fast(shared=True) as srv, srv.gateway(max_body_bytes=64 * 1024) as gw:
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice", Host="evil.example"))
        assert r.status_code == 421
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice", Origin="https://evil.example"))
        assert r.status_code == 403
        big = {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "execute_command", "arguments": {"command": "x" * 100_000}},
        }
        r = await gw.http.post(gw.url, json=big, headers=gw.headers("alice"))
        assert r.status_code == 413 and "--max-body-bytes 65536" in r.json()["error"]["message"]
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice", Origin="http://127.0.0.1:8765"))
        assert r.status_code == 200  # the server's own origin is fine
        assert srv.fake.runs == []


async def test_sessions_are_long_random_and_bound_to_their_tenant(fast):
    async with fast(shared=True) as srv, srv.gateway() as gw:
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice"))
        assert r.status_code == 200
        sid = r.headers["mcp-session-id"]
        assert len(sid) == 64 and int(sid, 16) >= 0  # 256 random bits, not the SDK's own id
        [session] = gw.gateway.sessions.values()
        assert session.internal != sid and session.tenant == "alice"
        ok = await gw.http.post(gw.url, json=LIST, headers=gw.headers("alice", **{"mcp-session-id": sid}, **V))
        assert ok.status_code == 200 and "execute_command" in ok.text
        stolen = await gw.http.post(gw.url, json=LIST, headers=gw.headers("bob", **{"mcp-session-id": sid}, **V))
        unknown = await gw.http.post(gw.url, json=LIST, headers=gw.headers("bob", **{"mcp-session-id": "ab" * 32}, **V))
        internal = await gw.http.post(
            gw.url, json=LIST, headers=gw.headers("alice", **{"mcp-session-id": session.internal}, **V)
        )
        assert stolen.status_code == unknown.status_code == internal.status_code == 404
        assert stolen.json() == unknown.json() == internal.json()
        assert "execute_command" not in stolen.text
        # DELETE ends it: the id is then unknown, like any other.
        bye = await gw.http.delete(gw.url, headers=gw.headers("alice", **{"mcp-session-id": sid}, **V))
        assert bye.status_code < 300 and gw.gateway.sessions == {}
        after = await gw.http.post(gw.url, json=LIST, headers=gw.headers("alice", **{"mcp-session-id": sid}, **V))
        assert after.status_code == 404


async def test_session_caps_give_clear_errors(fast):
    async with fast(shared=True) as srv, srv.gateway(max_sessions_per_tenant=2, max_sessions=3) as gw:
        for _ in range(2):
            assert (await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice"))).status_code == 200
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("alice"))
        assert r.status_code == 429 and r.headers["retry-after"] == "60"
        assert "--max-sessions-per-tenant 2" in r.json()["error"]["message"]
        assert (await gw.http.post(gw.url, json=INIT, headers=gw.headers("bob"))).status_code == 200
        r = await gw.http.post(gw.url, json=INIT, headers=gw.headers("bob"))
        assert r.status_code == 503 and "--max-sessions 3" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_two_tenants_see_only_their_own(fast, mode):
    async with (
        fast(shared=True) as srv,
        srv.gateway() as gw,
        gw.client("alice", mode=mode) as a,
        gw.client("bob", mode=mode) as b,
    ):
        srv.fake.script("sleep 60", block=True)
        mine = structured(await a.call_tool("execute_command", {"command": "echo alice"}))
        rid = mine["result_id"]
        receipt = structured(await a.call_tool("inspect_result", {"result_id": rid, "receipt": True}))
        assert mine["stdout"] == "alice\n" and receipt["limits"]["tenant"] == "alice"
        theirs = await b.call_tool("inspect_result", {"result_id": rid})
        unknown = await b.call_tool("inspect_result", {"result_id": "res_" + "0" * 32})
        assert theirs.is_error and unknown.is_error
        assert text(theirs).replace(rid, "X") == text(unknown).replace("res_" + "0" * 32, "X")
        bg = structured(await a.call_tool("execute_command", {"command": "sleep 60", "background": True}))
        assert [c["result_id"] for c in structured(await a.call_tool("list_active", {}))["commands"]] == [
            bg["result_id"]
        ]
        assert structured(await b.call_tool("list_active", {}))["commands"] == []
        assert (await b.call_tool("cancel_command", {"result_id": bg["result_id"]})).is_error
        done = structured(await a.call_tool("cancel_command", {"result_id": bg["result_id"]}))
        assert done["status"] == "killed"
    tenants = {a["tenant"] for a in srv.audit()}
    assert tenants == {"alice"}


async def test_every_json_answer_of_the_gateway_goes_through_the_renderer():
    """asgi.respond renders every string: a 401/403 reason may quote a token's own claims."""
    import json as _json

    from gvisor_mcp.asgi import respond

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await respond(send, 403, {"error": "forbidden", "message": "tenant 'x\x1b]0;pwned\x07\u202e' is not in the policy"})
    message = _json.loads(sent[1]["body"])["message"]
    assert "\x1b" not in message and "\x07" not in message and "\u202e" not in message
    assert message.startswith("tenant 'x") and "is not in the policy" in message
