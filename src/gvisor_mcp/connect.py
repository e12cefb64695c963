"""`gvisor-mcp connect URL --token-file F`: a stdio MCP server that is the HTTP server's proxy.

Why it exists: a desktop user is not root, and running sandboxes needs root
(cgroups, runsc's own namespaces, workspace loop mounts). So root runs the
server once, as a service on loopback (`serve --transport http`), and the
user's MCP client (Claude Desktop, Claude Code, an IDE) starts this bridge as
its stdio server, as the user. The bridge holds the user's bearer token; it
never needs any privilege.

It forwards JSON-RPC messages, not MCP methods: the SDK's stdio server
transport on one side, its streamable HTTP client transport on the other.
Everything the two ends say passes through unchanged - tools, resources,
prompts, progress notifications, cancellation, server-to-client requests,
and methods this bridge has never heard of - so it cannot fall behind the
server as tools are added. What the bridge adds is what HTTP needs and stdio
does not have: the `Authorization` header, the negotiated
`MCP-Protocol-Version` header on every message after `initialize` (and the
per-message headers of protocol 2026-07-28), the session id (the SDK
transport keeps it), and errors a person can act on when the server is down
or refuses the token (the SDK would say "Server returned an error response").
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import PROTOCOL_VERSION_META_KEY, JSONRPCError, JSONRPCNotification, JSONRPCRequest, JSONRPCResponse

from .errors import ConfigurationError

UNREACHABLE = -32000
"""JSON-RPC error code of a request the bridge could not deliver (server down, refused connection, TLS failure)."""
REFUSED = -32001
"""JSON-RPC error code of a request the server refused before MCP (401/403: token unknown, revoked, wrong tenant)."""
SESSION_LOST = -32002
"""JSON-RPC error code of a request in a session the server no longer knows (it restarted, or ended the session)."""

READ_TIMEOUT = 900.0
"""Seconds a response stream may stay silent; above the longest timeout a policy may grant (10 min)."""


class ConnectError(ConfigurationError):
    """A bridge that cannot start (bad URL, unreadable token file); its text is the one line the user sees."""


def read_token(path: str) -> str:
    """The bearer token in `path` (the line `gvisor-mcp token add` printed); whitespace around it ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConnectError(
            f"cannot read the token file {path!r}: {e.strerror or e}; give the file that holds the token "
            "`gvisor-mcp token add TENANT` printed (readable by you, e.g. chmod 600)"
        ) from None
    except UnicodeDecodeError:
        raise ConnectError(f"the token file {path!r} is not text; it must hold the one-line token") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or any(c.isspace() for c in lines[0]):
        raise ConnectError(
            f"the token file {path!r} must hold exactly one token on one line (found {len(lines)} non-empty lines)"
        )
    return lines[0]


def token_file_warning(path: str) -> str | None:
    """A token others on the machine can read is a token they can use."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"warning: the token file {path!r} is readable by other users; chmod 600 it"
    return None


def check_url(url: str) -> str:
    """An http(s) URL; plain http only to this machine, since the token travels in every request."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectError(
            f"URL {url!r} is not an http(s) URL; expected the server's MCP endpoint, like http://127.0.0.1:8765/mcp"
        )
    host = parts.hostname
    if parts.scheme == "http" and not (host == "localhost" or host == "::1" or host.startswith("127.")):
        raise ConnectError(
            f"URL {url!r} sends the token unencrypted to another machine; use https:// (the server's "
            "--tls-cert, or a TLS proxy) or a loopback address"
        )
    return url


def load_ca(path: str, url: str) -> ssl.SSLContext:
    """Trust exactly this CA for the server's certificate, like curl's --cacert.

    A server with its own --tls-cert is usually signed by a private CA the
    desktop does not trust; adding it to the system store would trust it for
    everything, this trusts it for this bridge only.
    """
    if urlsplit(url).scheme != "https":
        raise ConnectError(f"--ca-file is for https:// URLs; {url!r} is plain http (drop --ca-file, or use https://)")
    try:
        return ssl.create_default_context(cafile=path)
    except ssl.SSLError as e:
        raise ConnectError(
            f"the CA file {path!r} holds no PEM certificate ({e.reason or e}); give the PEM file of the CA that "
            "signed the server's certificate"
        ) from None
    except OSError as e:
        raise ConnectError(
            f"cannot read the CA file {path!r}: {e.strerror or e}; give the PEM file of the CA that signed the "
            "server's certificate (readable by you)"
        ) from None


def _jsonrpc_error(code: int, message: str) -> bytes:
    # id null: the SDK transport puts the id of the request this answered.
    return json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}).encode()


@dataclass
class Explain(httpx2.AsyncBaseTransport):
    """Turns "cannot connect" and 401/403 into JSON-RPC errors that say what to do.

    The SDK transport surfaces a non-2xx response whose body is a JSON-RPC
    error as that error, answering the request that caused it; without this
    the client would see a generic "Server returned an error response", or
    the bridge would die of a ConnectError.
    """

    url: str
    token_file: str
    inner: httpx2.AsyncBaseTransport = field(default_factory=httpx2.AsyncHTTPTransport)
    said: set[str] = field(default_factory=set)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except httpx2.TransportError as e:
            why = _reason(e)
            if "CERTIFICATE_VERIFY_FAILED" in why:
                return self._fail(
                    request,
                    502,
                    UNREACHABLE,
                    (
                        f"gvisor-mcp connect: the server at {self.url} sent a certificate this machine does not "
                        f"trust ({why}). If it is signed by your own CA, give that CA's PEM file with --ca-file FILE"
                    ),
                )
            return self._fail(
                request,
                502,
                UNREACHABLE,
                (
                    f"gvisor-mcp connect: cannot reach the gvisor-mcp server at {self.url} ({why}). Is it running? "
                    "On the server machine: `systemctl status gvisor-mcp` (docs/desktop.md)"
                ),
            )
        if response.status_code in (401, 403):
            body = await response.aread()
            await response.aclose()
            try:
                detail = json.loads(body).get("message") or ""
            except (ValueError, AttributeError):
                detail = body[:200].decode("utf-8", "replace")
            what = "refused the token in" if response.status_code == 401 else "does not let the token in"
            return self._fail(
                request,
                response.status_code,
                REFUSED,
                (
                    f"gvisor-mcp connect: the server at {self.url} {what} {self.token_file} "
                    f"(HTTP {response.status_code}: {detail}). Ask the operator for a new token "
                    "(`gvisor-mcp token add TENANT`) and put it in that file"
                ),
            )
        if response.status_code == 404 and request.method == "POST" and "mcp-session-id" in request.headers:
            await response.aclose()
            return self._fail(
                request,
                404,
                SESSION_LOST,
                (
                    f"gvisor-mcp connect: the server at {self.url} no longer knows this session (it restarted, or "
                    "ended the session); its session workspace is gone. Restart the MCP client (in Claude Code: /mcp, "
                    "reconnect) to open a new session"
                ),
            )
        return response

    def _fail(self, request: httpx2.Request, status: int, code: int, message: str) -> httpx2.Response:
        if message not in self.said:  # once in the client's log, not once per request
            self.said.add(message)
            print(message, file=sys.stderr, flush=True)
        return httpx2.Response(
            status,
            headers={"content-type": "application/json"},
            content=_jsonrpc_error(code, message),
            request=request,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _reason(e: BaseException) -> str:
    """The OS's word for it ("Connection refused"), not httpx's "All connection attempts failed"."""
    seen: BaseException | None = e
    deepest = str(e) or type(e).__name__
    while seen is not None:
        if isinstance(seen, ssl.SSLError):  # an OSError whose errno is OpenSSL's code (1 reads "not permitted")
            return str(seen)
        if isinstance(seen, OSError) and isinstance(seen.errno, int) and seen.errno > 0:
            deepest = os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return deepest


@dataclass
class Headers:
    """The per-message HTTP headers a streamable HTTP client sends, for messages that came over stdio."""

    negotiated: str | None = None
    """The protocol version the server answered `initialize` with."""
    initialize_ids: set[Any] = field(default_factory=set)

    def outgoing(self, message: Any) -> ClientMessageMetadata | None:
        headers: dict[str, str] = {}
        if isinstance(message, JSONRPCRequest | JSONRPCNotification):
            params = message.params or {}
            meta = params.get("_meta") if isinstance(params, dict) else None
            modern = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
            if isinstance(modern, str):  # protocol 2026-07-28: every message says its version and method
                headers[MCP_PROTOCOL_VERSION_HEADER] = modern
                headers[MCP_METHOD_HEADER] = message.method
                key = NAME_BEARING_METHODS.get(message.method)
                if key is not None and isinstance(name := params.get(key), str):
                    headers[MCP_NAME_HEADER] = encode_header_value(name)
            elif isinstance(message, JSONRPCRequest) and message.method == "initialize":
                self.initialize_ids.add(message.id)
            elif self.negotiated:
                headers[MCP_PROTOCOL_VERSION_HEADER] = self.negotiated
        elif self.negotiated:  # a response to a server-to-client request
            headers[MCP_PROTOCOL_VERSION_HEADER] = self.negotiated
        return ClientMessageMetadata(headers=headers) if headers else None

    def incoming(self, message: Any) -> None:
        if isinstance(message, JSONRPCResponse | JSONRPCError) and message.id in self.initialize_ids:
            self.initialize_ids.discard(message.id)
            if isinstance(message, JSONRPCResponse) and isinstance(v := message.result.get("protocolVersion"), str):
                self.negotiated = v


async def bridge(url: str, token: str, token_file: str, ca: ssl.SSLContext | None = None) -> None:
    """Forward stdin's messages to the server and the server's to stdout until stdin ends."""
    timeout = httpx2.Timeout(30.0, read=READ_TIMEOUT)
    explain = Explain(url, token_file)
    if ca is not None:
        explain.inner = httpx2.AsyncHTTPTransport(verify=ca)
    headers = Headers()
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout, transport=explain) as http,
        streamable_http_client(url, http_client=http) as (from_server, to_server),
        stdio_server() as (from_client, to_client),
        anyio.create_task_group() as tg,
    ):

        async def upstream() -> None:
            async for item in from_client:
                if isinstance(item, Exception):  # a line that is not JSON-RPC: the SDK said why
                    print(f"gvisor-mcp connect: ignored a message from the client: {item}", file=sys.stderr)
                    continue
                await to_server.send(SessionMessage(item.message, metadata=headers.outgoing(item.message)))
            tg.cancel_scope.cancel()  # the client closed stdin: end the session (DELETE) and exit

        async def downstream() -> None:
            async for item in from_server:
                if isinstance(item, Exception):
                    print(f"gvisor-mcp connect: {item}", file=sys.stderr)
                    continue
                headers.incoming(item.message)
                await to_client.send(SessionMessage(item.message))

        tg.start_soon(upstream)
        tg.start_soon(downstream)


def connect_main(url: str, token_file: str, ca_file: str | None = None) -> int:
    try:
        check_url(url)
        token = read_token(token_file)
        ca = load_ca(ca_file, url) if ca_file else None
    except ConnectError as e:
        print(f"gvisor-mcp connect: {e}", file=sys.stderr)
        return 2
    if warning := token_file_warning(token_file):
        print(f"gvisor-mcp connect: {warning}", file=sys.stderr)
    anyio.run(bridge, url, token, token_file, ca)
    return 0
