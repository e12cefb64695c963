"""Streamable HTTP for several tenants: bearer tokens, one MCP server per tenant.

Shape: one Runtime (one Manager with one global capacity, one store, one
audit log) shared by every tenant, and in front of it one `MCPServer` per
tenant (each publishes its own tenant's policy in the tool schemas, and has
its own session manager). The Gateway is the ASGI app uvicorn serves:

1. every request needs `Authorization: Bearer <token>`; without a valid one
   it gets 401 before anything else happens. The tenant comes only from the
   token.
2. `/metrics` is for `@metrics` tokens only; `/mcp` for tenant tokens.
3. MCP session ids are replaced at the edge by 256-bit random ones, bound to
   the tenant that opened the session: another tenant presenting that id
   gets "Session not found", as for an id that never existed. (The SDK's own
   ids are uuid4, 122 random bits; they never leave the process.)
4. Host and Origin checks (421 / 403) and the body limit (413) are the SDK's
   TransportSecuritySettings and max_request_body_size, configured
   explicitly here (the SDK leaves the checks off when not configured). A
   request body must arrive within `body_timeout` seconds; uvicorn closes
   idle keep-alive connections after `timeout_keep_alive`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from .metrics import CONTENT_TYPE_LATEST
from .policy import UnknownTenant
from .server import AppState, PolicyHolder, Runtime, Settings, build_server, runtime
from .tokens import METRICS_ROLE, TokenFile

log = structlog.get_logger("gvisor_mcp.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SESSION_HEADER = b"mcp-session-id"


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    tokens_path: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    behind_tls_proxy: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0
    keep_alive_timeout: float = 15.0
    session_idle_timeout: float = 1800.0

    def check(self) -> None:
        """Refuse configurations that would expose tokens in clear text."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not _is_loopback(self.host) and not self.tls_cert and not self.behind_tls_proxy:
            raise ValueError(
                f"refusing to listen on {self.host} without TLS: bearer tokens would cross the network "
                "in clear text. Pass --tls-cert/--tls-key, or --behind-tls-proxy when a proxy in front "
                "terminates TLS, or bind to 127.0.0.1"
            )
        if not self.tokens_path:
            raise ValueError("--tokens FILE is required with --transport http (create it with `gvisor-mcp token add TENANT`)")

    def security(self) -> Any:
        from mcp.server.transport_security import TransportSecuritySettings

        hosts = [f"127.0.0.1:{self.port}", f"localhost:{self.port}", f"[::1]:{self.port}"]
        if not _is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):
            hosts.append(f"{self.host}:{self.port}")
        scheme = "https" if self.tls_cert or self.behind_tls_proxy else "http"
        origins = [f"{scheme}://{h}" for h in hosts]
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*hosts, *self.allowed_hosts],
            allowed_origins=[*origins, *self.allowed_origins],
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class TenantHost:
    app: AppState
    asgi: Any


@dataclass
class Session:
    tenant: str
    internal: str


@dataclass
class Gateway:
    rt: Runtime
    tokens: TokenFile
    options: HttpOptions
    tg: anyio.abc.TaskGroup
    hosts: dict[str, TenantHost] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    """external session id -> tenant and the SDK's id"""
    external_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    """(tenant, the SDK's id) -> external session id"""
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    # --- ASGI ---------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        tenant = self.tokens.tenant_for(_bearer(scope))
        if tenant is None:
            await _respond(send, 401, {
                "error": "unauthorized",
                "message": "a valid bearer token is required: `Authorization: Bearer <token>`; "
                "the operator creates one with `gvisor-mcp token add TENANT`",
            }, extra=[(b"www-authenticate", b'Bearer realm="gvisor-mcp"')])
            return
        path = scope.get("path", "")
        if path == "/metrics":
            if tenant != METRICS_ROLE:
                await _respond(send, 403, {"error": "forbidden", "message": "/metrics needs a metrics token "
                                           "(`gvisor-mcp token add --metrics`)"})
                return
            await _respond_bytes(send, 200, self.rt.metrics.exposition(), CONTENT_TYPE_LATEST.encode())
            return
        if path.rstrip("/") != "/mcp":
            await _respond(send, 404, {"error": "not found", "message": "the MCP endpoint is /mcp"})
            return
        if tenant == METRICS_ROLE:
            await _respond(send, 403, {"error": "forbidden", "message": "a metrics token cannot call tools"})
            return
        try:
            self.rt.policy.current.tenant(tenant)
        except UnknownTenant:
            await _respond(send, 403, {"error": "forbidden", "message": f"tenant {tenant!r} of this token is "
                                       "not in the policy; ask the operator"})
            return
        await self._mcp(tenant, scope, receive, send)

    async def _mcp(self, tenant: str, scope: Scope, receive: Receive, send: Send) -> None:
        host = await self._host(tenant)
        external = _header(scope, SESSION_HEADER)
        if external is not None:
            session = self.sessions.get(external)
            if session is None or session.tenant != tenant:
                await _respond(send, 404, {"jsonrpc": "2.0", "id": None,
                                           "error": {"code": -32001, "message": "Session not found"}})
                return
            scope = _with_header(scope, SESSION_HEADER, session.internal)
        else:
            session = None
        status = 0

        async def send_mapped(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                internal = _header(message, SESSION_HEADER)
                if internal is not None:
                    ext = self._external(tenant, internal)
                    message = _with_header(message, SESSION_HEADER, ext)
            await send(message)

        await host.asgi(scope, _bounded(receive, self.options.body_timeout), send_mapped)
        if session is not None and external is not None:
            ended = scope["method"] == "DELETE" and status < 300
            if ended or status == 404:  # closed by the client, or by the SDK (idle timeout)
                self.sessions.pop(external, None)
                self.external_ids.pop((tenant, session.internal), None)
                host.app.drop_session(session.internal)

    def _external(self, tenant: str, internal: str) -> str:
        ext = self.external_ids.get((tenant, internal))
        if ext is None:
            ext = secrets.token_hex(32)
            self.sessions[ext] = Session(tenant, internal)
            self.external_ids[(tenant, internal)] = ext
            log.info("http_session_opened", tenant=tenant)
        return ext

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
        async def lifespan(_server: Any) -> AsyncIterator[AppState]:
            yield app

        server = build_server(self.rt.settings, self.rt.policy, tenant, lifespan=lifespan, over_http=True)
        asgi = server.streamable_http_app(
            streamable_http_path="/mcp",
            transport_security=self.options.security(),
            max_request_body_size=self.options.max_body_bytes,
            session_idle_timeout=self.options.session_idle_timeout,
            host=self.options.host,
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


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


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

    async def wrapped() -> dict[str, Any]:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            with anyio.fail_after(timeout):
                message = await receive()
        except TimeoutError:
            raise SlowClient(f"request body not received within {timeout:g} s") from None
        if message["type"] != "http.request" or not message.get("more_body"):
            body_done = True
        return message

    return wrapped


async def _respond(send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    await _respond_bytes(send, status, json.dumps(body).encode(), b"application/json", extra)


async def _respond_bytes(
    send: Send, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]] = ()  # type: ignore[assignment]
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _uvicorn_server(app: Any, **config: Any) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def,override]
            # Signals are ours: uvicorn would re-raise SIGTERM after serving and
            # kill the process before the Runtime cleaned up its sandboxes.
            yield

    return Server(uvicorn.Config(
        app, lifespan="off", log_config=None, access_log=False, server_header=False, **config
    ))


async def serve_metrics(metrics: Any, port: int) -> None:
    """stdio's --metrics-port: /metrics on loopback only, no token (one local user)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope.get("path") != "/metrics":
            await _respond(send, 404, {"error": "not found", "message": "only /metrics is served here"})
            return
        await _respond_bytes(send, 200, metrics.exposition(), CONTENT_TYPE_LATEST.encode())

    server = _uvicorn_server(app, host="127.0.0.1", port=port)
    try:
        await server.serve()
    finally:
        server.should_exit = True


async def serve_http(settings: Settings, policy: PolicyHolder, options: HttpOptions) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the policy and the tokens file."""
    # A tenant's MCP server is built at its first request; import what that
    # needs before listening, so the first request does not pay seconds of imports.
    from mcp.server.mcpserver import MCPServer  # noqa: F401

    from .tools import register_tools  # noqa: F401

    async with runtime(settings, policy) as rt, anyio.create_task_group() as tg:
        gateway = Gateway(rt, TokenFile.load(options.tokens_path), options, tg)
        server = _uvicorn_server(
            gateway,
            host=options.host,
            port=options.port,
            timeout_keep_alive=int(options.keep_alive_timeout),
            ssl_certfile=options.tls_cert,
            ssl_keyfile=options.tls_key,
        )

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    if sig == signal.SIGHUP:
                        policy.reload()
                        try:
                            gateway.tokens = TokenFile.load(options.tokens_path)
                            log.info("tokens_reloaded", count=len(gateway.tokens.entries))
                        except ValueError as e:
                            log.error("tokens_reload_failed", error=str(e))
                        continue
                    log.info("signal", signal=sig.name)
                    server.should_exit = True

        tg.start_soon(signals)
        log.info("http_listening", host=options.host, port=options.port, tls=bool(options.tls_cert))
        await server.serve()
        tg.cancel_scope.cancel()
