"""ASGI apps served by Granian inside our event loop, and small responders.

Both transports use it: http.py for the MCP gateway, stdio.py for
`--metrics-port`. Granian is imported when a server starts (a heavy native
module that `gvisor-mcp run`/`doctor` never need).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from .metrics import CONTENT_TYPE_LATEST, Metrics
from .text import render_value

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def respond(send: Send, status: int, body: dict[str, Any], extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A JSON answer; its strings can quote a request (a token's tenant claim, a
    header), so they go through the one renderer like every other client text."""
    await respond_bytes(send, status, json.dumps(render_value(body)).encode(), b"application/json", extra)


async def respond_bytes(
    send: Send, status: int, body: bytes, content_type: bytes, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


HEADER_TIMEOUT = 10.0
MAX_CONNECTIONS = 512


async def serve_asgi(
    app: Any,
    host: str,
    port: int,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    """Serve `app` with Granian, embedded in this event loop, until cancelled.

    Why Granian and not uvicorn: uvicorn has no timeout on reading a
    request's head (its keep-alive timer is disarmed by every byte received,
    and `limit_concurrency` only answers 503 once a head is complete), so 200
    clients sending headers a byte at a time held 200 connections forever
    (issue 14, finding 8). Granian (hyper underneath) has all three limits
    as its own settings:

    - `header_read_timeout`: the whole request head must arrive within it,
      counted from the connection's start and again whenever a kept-alive
      connection goes idle (so it is the keep-alive idle limit too);
    - `backpressure`: connections open at once; past it, new ones wait in
      the kernel's listen backlog (no fd, no task) until one closes;
    - HTTP/1.1 only (MCP clients speak it; no h2 stream limits to tune).

    (Hypercorn also times out a request head, through its keep-alive timer,
    but has no connection cap.) Granian is started and stopped here, not by
    its own signal handling: signals are the server's (lifecycle.py).
    """
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server.embed import Server

    server = Server(
        app,
        address=host,
        port=port,
        interface=Interfaces.ASGINL,  # no ASGI lifespan: the Runtime is ours
        http=HTTPModes.http1,
        websockets=False,
        backlog=1024,
        backpressure=max_connections,
        http1_settings=HTTP1Settings(header_read_timeout=int(header_timeout * 1000), keep_alive=True),
        log_level=LogLevels.error,
        log_dictconfig=_GRANIAN_LOGS,
        ssl_cert=Path(tls_cert) if tls_cert else None,
        ssl_key=Path(tls_key) if tls_key else None,
    )
    done = anyio.Event()

    async def run() -> None:
        try:
            with anyio.CancelScope(shield=True):  # stopped below, never cut half-way
                await server.serve()
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await done.wait()  # it ends by itself only on a failure (e.g. the port is taken)
            raise RuntimeError(f"the HTTP server on {host}:{port} stopped")
        finally:
            server.stop()
            with anyio.CancelScope(shield=True):
                await done.wait()


_GRANIAN_LOGS = {
    # Granian's default handlers write to stdout: never there (stdio's MCP channel).
    "handlers": {
        "console": {"formatter": "generic", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
    },
}


async def serve_metrics(metrics: Metrics, port: int) -> None:
    """stdio's --metrics-port: /metrics on loopback only, no token (one local user)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope.get("path") != "/metrics":
            await respond(send, 404, {"error": "not found", "message": "only /metrics is served here"})
            return
        await respond_bytes(send, 200, metrics.exposition(), CONTENT_TYPE_LATEST.encode())

    await serve_asgi(app, "127.0.0.1", port, max_connections=64)
