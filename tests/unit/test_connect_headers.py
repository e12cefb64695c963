"""`gvisor-mcp connect` adds the per-message HTTP headers a stdio client cannot send (connect.Headers)."""

from __future__ import annotations

import errno

import httpx2
from mcp_types import PROTOCOL_VERSION_META_KEY, JSONRPCError, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse

from gvisor_mcp.connect import Headers, _reason

VERSION = "mcp-protocol-version"


def headers_of(h: Headers, message) -> dict[str, str]:
    meta = h.outgoing(message)
    return dict(meta.headers) if meta is not None and meta.headers else {}


def test_the_negotiated_version_goes_on_every_message_after_initialize() -> None:
    h = Headers()
    init = JSONRPCRequest(jsonrpc="2.0", id=7, method="initialize", params={"protocolVersion": "2025-11-25"})
    assert headers_of(h, init) == {}  # initialize negotiates; it carries no version header
    before = JSONRPCRequest(jsonrpc="2.0", id=8, method="tools/list")
    assert headers_of(h, before) == {}  # nothing negotiated yet
    h.incoming(JSONRPCResponse(jsonrpc="2.0", id=7, result={"protocolVersion": "2025-06-18", "capabilities": {}}))
    assert h.negotiated == "2025-06-18"
    for message in (
        JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized"),
        JSONRPCRequest(jsonrpc="2.0", id=9, method="tools/call", params={"name": "execute_command"}),
        JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled", params={"requestId": 9}),
        JSONRPCResponse(jsonrpc="2.0", id="s1", result={}),  # answering a server-to-client request
    ):
        assert headers_of(h, message) == {VERSION: "2025-06-18"}, message
    # Another id's response does not renegotiate; a failed initialize changes nothing.
    h.incoming(JSONRPCResponse(jsonrpc="2.0", id=9, result={"protocolVersion": "1999-01-01"}))
    h.outgoing(JSONRPCRequest(jsonrpc="2.0", id=10, method="initialize", params={}))
    h.incoming(JSONRPCError(jsonrpc="2.0", id=10, error={"code": -32602, "message": "no"}))
    assert h.negotiated == "2025-06-18"


def test_a_2026_message_carries_its_own_version_method_and_name() -> None:
    h = Headers(negotiated="2025-06-18")
    call = JSONRPCRequest(
        jsonrpc="2.0",
        id=1,
        method="tools/call",
        params={"name": "execute_command", "arguments": {}, "_meta": {PROTOCOL_VERSION_META_KEY: "2026-07-28"}},
    )
    assert headers_of(h, call) == {VERSION: "2026-07-28", "mcp-method": "tools/call", "mcp-name": "execute_command"}
    read = JSONRPCRequest(
        jsonrpc="2.0",
        id=2,
        method="resources/read",
        params={"uri": "workspace:///a.txt", "_meta": {PROTOCOL_VERSION_META_KEY: "2026-07-28"}},
    )
    assert headers_of(h, read)["mcp-name"] == "workspace:///a.txt"


def test_a_connection_failure_is_told_in_the_oss_words() -> None:
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 1)")
        except OSError as inner:
            raise httpx2.ConnectError("All connection attempts failed") from inner
    except httpx2.ConnectError as e:
        assert _reason(e) == "Connection refused"
    assert _reason(httpx2.ReadTimeout("timed out")) == "timed out"
