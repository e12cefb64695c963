"""A reverse proxy on 127.0.0.1 that adds `Authorization: Bearer ...` to every request.

For clients that cannot send a header (the official conformance suite's
server scenarios take only a URL). It rewrites the Host and Origin that
name the proxy to name the server, and leaves any other Host or Origin
as sent (so the server's own DNS-rebinding checks are what is tested).
Served by the same Granian embedding as the server (gvisor_mcp.http.serve_asgi).
"""

from __future__ import annotations

from typing import Any

import httpx2

HOP = {
    b"host",
    b"authorization",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"te",
    b"upgrade",
    b"proxy-connection",
}


class HeaderProxy:
    def __init__(self, proxy_port: int, server_port: int, token: str) -> None:
        self.proxy_port = proxy_port
        self.server_port = server_port
        self.token = token
        self.http = httpx2.AsyncClient(timeout=httpx2.Timeout(300, connect=10), follow_redirects=False)

    def _map(self, value: bytes) -> bytes:
        return value.replace(f"127.0.0.1:{self.proxy_port}".encode(), f"127.0.0.1:{self.server_port}".encode()).replace(
            f"localhost:{self.proxy_port}".encode(), f"localhost:{self.server_port}".encode()
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP]
        headers = [(k, self._map(v) if k.lower() == b"origin" else v) for k, v in headers]
        host = dict((k.lower(), v) for k, v in scope["headers"]).get(b"host", b"")
        headers += [(b"host", self._map(host)), (b"authorization", f"Bearer {self.token}".encode())]
        url = f"http://127.0.0.1:{self.server_port}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = self.http.build_request(scope["method"], url, headers=headers, content=body)
        response = await self.http.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
