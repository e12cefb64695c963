"""Streamable HTTP for several tenants: bearer tokens, one MCP server per tenant.

Shape: one Runtime (one Manager with one global capacity, one store, one
audit log) shared by every tenant, and in front of it one `MCPServer` per
tenant (each publishes its own tenant's policy in the tool schemas, and has
its own session manager). The Gateway is the ASGI app Granian serves:

1. every request needs `Authorization: Bearer <token>` (a static token or,
   in OAuth mode, a JWT access token: auth.py, oauth.py); without a valid
   one it gets 401 before anything else happens. The tenant comes only from
   the token. Only the RFC 9728 metadata (OAuth mode) is public.
2. `/metrics` is for `@metrics` tokens only; `/mcp` for tenant tokens.
3. MCP session ids are replaced at the edge by 256-bit random ones, bound to
   the tenant that opened the session: another tenant presenting that id
   gets "Session not found", as for an id that never existed. (The SDK's own
   ids are uuid4, 122 random bits; they never leave the process.)
4. Host and Origin checks (421 / 403) and the body limit (413) are the SDK's
   TransportSecuritySettings and max_request_body_size, configured
   explicitly here (the SDK leaves the checks off when not configured). A
   request body must arrive within `body_timeout` seconds; the request
   head within `header_timeout` (Granian's own limit, see serve_asgi), which
   also closes idle kept-alive connections; at most `max_connections` are
   open at once.
5. Sessions: at most `max_sessions_per_tenant` per tenant and
   `max_sessions` in all (429 / 503 with what to do); one idle for
   `session_idle_timeout` is ended and its workspace freed. Only a POST
   (an initialize) may open a session: a sessionless GET or DELETE gets
   400, and a sessionless request the SDK refuses opens nothing.
6. Streams are resumable (events.py): SSE events carry ids, a priming event
   and `retry`; a GET with `Last-Event-ID` replays the rest of its stream.

Why over ~400 lines: the gateway's checks (token, tenant, session binding,
caps, body limits) are one request path read top to bottom; the Granian glue
and responders are in asgi.py.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from . import events, startup
from .asgi import Receive, Scope, Send, respond, respond_bytes, serve_asgi
from .auth import TenantTokenVerifier, WatchedTokenFile, authenticate, tenant_of, unauthorized_body
from .config import HttpOptions, ServeConfig, is_loopback
from .lifecycle import Signals
from .metrics import CONTENT_TYPE_LATEST
from .policy import UnknownTenant
from .progress import progress_token_problem
from .runtime import PolicyHolder, Runtime, TenantState, start_runtime
from .server import build_server
from .tokens import METRICS_ROLE

log = structlog.get_logger("gvisor_mcp.http")


SESSION_HEADER = b"mcp-session-id"
DRAIN_LIMIT = 64 * 1024 * 1024
"""A body declared larger than --max-body-bytes is read (and dropped) up to this
size so the client can read its 413; larger ones get the 413 at once."""


def transport_security(options: HttpOptions) -> TransportSecuritySettings:
    """The SDK's Host/Origin checks (421/403) for where we listen, plus the extras."""
    port = options.port
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    if not is_loopback(options.host) and options.host not in ("0.0.0.0", "::"):
        hosts.append(f"{options.host}:{port}")
    scheme = "https" if options.tls_cert or options.behind_tls_proxy else "http"
    origins = [f"{scheme}://{h}" for h in hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*hosts, *options.allowed_hosts],
        allowed_origins=[*origins, *options.allowed_origins],
    )


@dataclass
class TenantHost:
    app: TenantState
    asgi: Any


@dataclass
class Session:
    tenant: str
    internal: str
    last_active: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    """Requests of this session being served (an open GET stream counts)."""
    partition: str = ""
    """Its key in the event store (events.py)."""
    user: Any = None
    """The SDK's AuthenticatedUser that opened it (the SDK binds the session to it)."""


class SessionLimit(Exception):
    """A new session would exceed a cap; `status` and `message` are the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Gateway:
    rt: Runtime
    verifier: TenantTokenVerifier
    options: HttpOptions
    tg: anyio.abc.TaskGroup
    event_store: events.BoundedEventStore = field(default_factory=events.BoundedEventStore)
    hosts: dict[str, TenantHost] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    """external session id -> tenant and the SDK's id"""
    external_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    """(tenant, the SDK's id) -> external session id"""
    opening: dict[str, int] = field(default_factory=dict)
    """tenant -> requests without a session id in flight (each may open one)"""
    _lock: anyio.Lock = field(default_factory=anyio.Lock)
    _metadata_app: Any = None

    # --- ASGI ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        oauth = self.options.oauth
        if oauth is not None and path.startswith("/.well-known/oauth-protected-resource"):
            await self._metadata(scope, receive, send)
            return
        user = await authenticate(self.verifier, scope)
        if isinstance(user, str):
            body, extra = unauthorized_body(user, oauth)
            await respond(send, 401, body, extra)
            return
        tenant = tenant_of(user)
        scope = {**scope, "user": user}
        if path == "/metrics":
            if tenant != METRICS_ROLE:
                await respond(
                    send,
                    403,
                    {
                        "error": "forbidden",
                        "message": "/metrics needs a metrics token (`gvisor-mcp token add --metrics`)",
                    },
                )
                return
            await respond_bytes(send, 200, self.rt.metrics.exposition(), CONTENT_TYPE_LATEST.encode())
            return
        if path.rstrip("/") != "/mcp":
            await respond(send, 404, {"error": "not found", "message": "the MCP endpoint is /mcp"})
            return
        if tenant == METRICS_ROLE:
            await respond(send, 403, {"error": "forbidden", "message": "a metrics token cannot call tools"})
            return
        try:
            self.rt.policy.current.tenant(tenant)
        except UnknownTenant:
            await respond(
                send,
                403,
                {
                    "error": "forbidden",
                    "message": f"tenant {tenant!r} of this token is not in the policy; ask the operator",
                },
            )
            return
        await self._mcp(tenant, scope, receive, send)

    async def _metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._metadata_app is None and self.options.oauth is not None:
            self._metadata_app = self.options.oauth.metadata_app()
        await self._metadata_app(scope, receive, send)

    async def _mcp(self, tenant: str, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.options.max_body_bytes:
            await self._too_large(declared, receive, send)
            return
        external = _header(scope, SESSION_HEADER)
        if external is None and scope["method"] != "POST":
            await respond(
                send,
                400,
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {
                        "code": -32600,
                        "message": (
                            f"a {scope['method']} request needs an mcp-session-id header; open a session with an "
                            "initialize request (POST) first, then send its mcp-session-id"
                        ),
                    },
                },
            )
            return
        receive = _bounded(receive, self.options.body_timeout)
        if scope["method"] == "POST":
            body, receive = await _buffered(receive, self.options.max_body_bytes)
            problem = _progress_problem(body)
            if problem is not None:
                await respond(
                    send, 200, {"jsonrpc": "2.0", "id": problem[0], "error": {"code": -32602, "message": problem[1]}}
                )
                return
        host = await self._host(tenant)
        if external is not None:
            session = self.sessions.get(external)
            if session is None or session.tenant != tenant:
                await respond(
                    send, 404, {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": "Session not found"}}
                )
                return
            last_event = _header(scope, b"last-event-id")
            if last_event is not None:
                with events.partition(session.partition):
                    held = self.event_store.holds(last_event)
                if not held:
                    await respond(
                        send,
                        400,
                        {
                            "jsonrpc": "2.0",
                            "id": None,
                            "error": {
                                "code": -32600,
                                "message": (
                                    "Last-Event-ID names an event this server no longer holds (events are kept in memory, "
                                    f"at most {self.event_store.max_session_bytes} bytes per session); the call itself goes on: "
                                    "poll it with list_active and inspect_result"
                                ),
                            },
                        },
                    )
                    return
            scope = _with_header(scope, SESSION_HEADER, session.internal)
            session.in_flight += 1
            key = session.partition
        else:
            session = None
            key = secrets.token_hex(16)
            try:
                self._admit(tenant)
            except SessionLimit as e:
                log.warning("http_session_refused", tenant=tenant, reason=e.message)
                await respond(
                    send,
                    e.status,
                    {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": e.message}},
                    extra=[(b"retry-after", b"60")],
                )
                return
            self.opening[tenant] = self.opening.get(tenant, 0) + 1
        status = 0

        async def send_mapped(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                internal = _header(message, SESSION_HEADER)
                if internal is not None and (session is not None or status < 400):
                    # (a refused sessionless request opens no session: the SDK discards it too)
                    ext = self._external(tenant, internal, key, scope["user"])
                    message = _with_header(message, SESSION_HEADER, ext)
                elif internal is not None:
                    message = {
                        **message,
                        "headers": [(k, v) for k, v in message["headers"] if k.lower() != SESSION_HEADER],
                    }
            await send(message)

        try:
            with events.partition(key):
                await host.asgi(scope, receive, send_mapped)
        finally:
            if session is None:
                self.opening[tenant] -= 1
            else:
                session.in_flight -= 1
                session.last_active = time.monotonic()
        if session is not None and external is not None:
            ended = scope["method"] == "DELETE" and status < 300
            if ended or status == 404:  # closed by the client, or by the SDK
                self._forget(external, session, "closed" if ended else "gone")

    async def _too_large(self, declared: int, receive: Receive, send: Send) -> None:
        """413 for a body declared too large, after reading what the client sends
        (up to DRAIN_LIMIT): Granian closes a connection whose request body is
        left unread, and a client still writing its body would see a reset
        instead of the answer."""
        if declared <= DRAIN_LIMIT:
            with contextlib.suppress(SlowClient, OSError):
                received = 0
                bounded = _bounded(receive, self.options.body_timeout)
                while received <= declared:
                    message = await bounded()
                    received += len(message.get("body", b""))
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
        await respond(
            send,
            413,
            {
                "jsonrpc": "2.0",
                "id": None,
                "error": {
                    "code": -32600,
                    "message": (
                        f"request body of {declared} bytes is larger than this server accepts "
                        f"(--max-body-bytes {self.options.max_body_bytes}); send less"
                    ),
                },
            },
            extra=[(b"connection", b"close")],
        )

    def _admit(self, tenant: str) -> None:
        """Raise SessionLimit when a new session of `tenant` would exceed a cap.

        Requests that carry no session id count while they are in flight
        (any of them may be an initialize that opens one).
        """
        o = self.options
        mine = sum(1 for s in self.sessions.values() if s.tenant == tenant) + self.opening.get(tenant, 0)
        if mine >= o.max_sessions_per_tenant:
            raise SessionLimit(
                429,
                (
                    f"tenant {tenant!r} already has {mine} open MCP sessions, the most this server allows per "
                    f"tenant (--max-sessions-per-tenant {o.max_sessions_per_tenant}). End one (HTTP DELETE with "
                    f"its mcp-session-id) or wait until an idle one expires ({o.session_idle_timeout:g} s without "
                    "a request), then open a new session"
                ),
            )
        total = len(self.sessions) + sum(self.opening.values())
        if total >= o.max_sessions:
            raise SessionLimit(
                503,
                (
                    f"this server already has {total} open MCP sessions, its limit (--max-sessions "
                    f"{o.max_sessions}). Try again later, when sessions have ended or expired "
                    f"({o.session_idle_timeout:g} s without a request)"
                ),
            )

    def _external(self, tenant: str, internal: str, partition: str, user: Any) -> str:
        ext = self.external_ids.get((tenant, internal))
        if ext is None:
            ext = secrets.token_hex(32)
            self.sessions[ext] = Session(tenant, internal, partition=partition, user=user)
            self.external_ids[(tenant, internal)] = ext
            log.info("http_session_opened", tenant=tenant, open=len(self.sessions))
        return ext

    def _forget(self, external: str, session: Session, why: str) -> None:
        """The session ended: forget its id and free its workspace (now, or when
        its last background command ends)."""
        self.sessions.pop(external, None)
        self.external_ids.pop((session.tenant, session.internal), None)
        self.event_store.forget(session.partition)
        host = self.hosts.get(session.tenant)
        if host is not None:
            host.app.drop_session(session.internal)
        log.info("http_session_ended", tenant=session.tenant, why=why, open=len(self.sessions))

    async def expire_idle_sessions(self) -> None:
        """End sessions with no request for `session_idle_timeout` seconds.

        The SDK has its own idle timeout but tells nobody when it fires, so
        its sessions' workspaces stayed mounted until the server stopped
        (issue 14, finding 5). The Gateway sees every request, so it keeps
        the clock: an expired session is ended through the SDK's own DELETE
        path, then its workspace is freed. The SDK's timeout (twice ours)
        stays as a backstop.
        """
        timeout = self.options.session_idle_timeout
        period = min(30.0, max(0.5, timeout / 4))
        while True:
            await anyio.sleep(period)
            now = time.monotonic()
            for external, session in list(self.sessions.items()):
                if session.in_flight == 0 and now - session.last_active >= timeout:
                    host = self.hosts.get(session.tenant)
                    if host is not None:
                        await _delete_session(host.asgi, session, self.options)
                    self._forget(external, session, "idle")
            for host in list(self.hosts.values()):
                host.app.reap_ended_sessions()

    # --- one MCP server per tenant ------------------------------------------

    async def _host(self, tenant: str) -> TenantHost:
        host = self.hosts.get(tenant)
        if host is None:
            async with self._lock:
                host = self.hosts.get(tenant)
                if host is None:
                    host = await self.tg.start(self._run_host, tenant)
                    self.hosts[tenant] = host
        return host

    async def _run_host(self, tenant: str, *, task_status: anyio.abc.TaskStatus[TenantHost]) -> None:
        """Host `tenant`'s MCPServer in a long-lived task (its session manager's task group)."""
        app = self.rt.app_for(tenant, session_from_request=True)

        @contextlib.asynccontextmanager
        async def lifespan(_server: MCPServer[TenantState]) -> AsyncIterator[TenantState]:
            yield app

        server = build_server(self.rt.config, self.rt.policy, tenant, lifespan, over_http=True)
        asgi = server.streamable_http_app(
            streamable_http_path="/mcp",
            transport_security=transport_security(self.options),
            max_request_body_size=self.options.max_body_bytes,
            session_idle_timeout=self.options.session_idle_timeout * 2,  # ours ends them first
            max_sessions=self.options.max_sessions_per_tenant,
            host=self.options.host,
            event_store=self.event_store,
            retry_interval=events.RETRY_MS,
        )
        async with server.session_manager.run():
            app.warm_pool()
            self.rt.policy.listeners.append(app.warm_pool)
            log.info("http_tenant_ready", tenant=tenant)
            task_status.started(TenantHost(app, asgi))
            try:
                await anyio.sleep_forever()
            finally:
                self.rt.policy.listeners.remove(app.warm_pool)


async def _delete_session(asgi: Any, session: Session, options: HttpOptions) -> None:
    """End a session the way a client would: DELETE with its id and its opener's credential (the SDK's own path)."""
    internal = session.internal
    host = f"127.0.0.1:{options.port}".encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "DELETE",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host), (SESSION_HEADER, internal.encode("latin-1"))],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", options.port),
        "user": session.user,
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(_message: dict[str, Any]) -> None:
        pass

    try:
        with anyio.fail_after(10):
            await asgi(scope, receive, send)
    except Exception as e:  # the session is forgotten anyway
        log.warning("http_session_delete_failed", error=str(e))


async def _buffered(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """Read a request's whole body (bounded in time by `receive`); a receive that replays it.

    Past `limit` bytes it stops and returns b"" with a receive that replays
    what was read and then reads on: the SDK's body limit answers 413.
    """
    messages: list[dict[str, Any]] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return b"", _replay(messages, receive)
        size += len(message.get("body", b""))
        if size > limit:
            return b"", _replay(messages, receive)
        if not message.get("more_body"):
            break
    body = b"".join(m.get("body", b"") for m in messages)
    return body, _replay([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replay(first: list[dict[str, Any]], receive: Receive) -> Receive:
    async def wrapped() -> dict[str, Any]:
        return first.pop(0) if first else await receive()

    return wrapped


def _progress_problem(body: bytes) -> tuple[Any, str] | None:
    """(request id, why) when a request's progressToken is refused, as over stdio (stdio.py)."""
    if b"progressToken" not in body:
        return None
    try:
        message = json.loads(body)
    except ValueError:
        return None  # the SDK answers a parse error
    for m in message if isinstance(message, list) else [message]:
        if isinstance(m, dict) and "id" in m and "method" in m:
            problem = progress_token_problem(m.get("params"))
            if problem is not None:
                return m["id"], problem
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _header(scope_or_message: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope_or_message.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _with_header(d: dict[str, Any], name: bytes, value: str) -> dict[str, Any]:
    headers = [(k, v) for k, v in d.get("headers", ()) if k.lower() != name]
    headers.append((name, value.encode("latin-1")))
    return {**d, "headers": headers}


class SlowClient(Exception):
    pass


def _bounded(receive: Receive, timeout: float) -> Receive:
    """A receive that gives the request body `timeout` seconds to arrive.

    Only the body is bounded: once it is complete, waiting on receive (for a
    disconnect, during a long streamed response) is normal.
    """
    body_done = False
    deadline: float | None = None

    async def wrapped() -> dict[str, Any]:
        nonlocal body_done, deadline
        if body_done:
            return await receive()
        if deadline is None:  # the whole body, not each chunk: a trickle is no escape
            deadline = anyio.current_time() + timeout
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                message = await receive()
        except TimeoutError:
            raise SlowClient(f"request body not received within {timeout:g} s") from None
        if message["type"] != "http.request" or not message.get("more_body"):
            body_done = True
        return message

    return wrapped


def serve(config: ServeConfig) -> int:
    """`gvisor-mcp serve --transport http`: start-up checks, then serve_http."""
    return startup.serve(config, serve_http)


async def serve_http(config: ServeConfig, policy: PolicyHolder, signals: Signals) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy and the tokens file."""
    options = config.http
    assert options is not None, "serve_http needs config.http"
    gateway: Gateway | None = None

    async def serve() -> None:
        nonlocal gateway
        async with start_runtime(config, policy) as rt, anyio.create_task_group() as tg:
            verifier = TenantTokenVerifier(WatchedTokenFile(options.tokens_path), options.oauth)
            gateway = Gateway(rt, verifier, options, tg)
            tg.start_soon(gateway.expire_idle_sessions)
            log.info(
                "http_listening",
                host=options.host,
                port=options.port,
                tls=bool(options.tls_cert),
                oauth_issuer=options.oauth.issuer if options.oauth else None,
                header_timeout=options.header_timeout,
                max_connections=options.max_connections,
            )
            # Stops taking requests first; then runtime() kills and records commands.
            await serve_asgi(
                gateway,
                options.host,
                options.port,
                header_timeout=options.header_timeout,
                max_connections=options.max_connections,
                tls_cert=options.tls_cert,
                tls_key=options.tls_key,
            )

    def reload() -> None:
        policy.reload()
        if gateway is None:
            return
        gateway.verifier.tokens.reload()

    await signals.guard(serve, on_reload=reload)
