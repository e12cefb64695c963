"""The egress proxy of one run: HTTP forwarding and CONNECT, nothing else.

Why our own (small, anyio) proxy and not a library: the proxy is the only
way out of the sandbox, so every line of it is security-critical, and the
maintained Python proxies (proxy.py, mitmproxy) are large, thread- or
plugin-based, and built to *add* features (TLS interception, plugins,
caching) we would have to turn off one by one. What we need is narrow:
one request head, an allowlist decision on a name we resolve ourselves, and
a byte pipe. The request head is parsed by h11 (python-hyper's maintained,
strict, sans-I/O HTTP/1.1 parser, pure Python, no dependencies of its own); the
rest is ~300 lines that can be read in one sitting.

Hardening, each with a test in tests/unit/test_proxy.py:
- one request per client connection; the upstream request is re-serialised
  by h11 (origin-form target, `Connection: close`, hop-by-hop headers
  dropped), so what reaches the server is a normalised message, and the
  response is relayed until the upstream closes;
- `Content-Length` together with `Transfer-Encoding`, conflicting lengths,
  obsolete line folding, a `Transfer-Encoding` other than chunked: 400
  (request smuggling);
- a `Host` header that disagrees with the absolute URI or the CONNECT
  authority: 400; userinfo in the URI (`http://ok.example@evil.example/`): 400;
- request heads over MAX_HEAD bytes: 431; a head not complete within
  HEAD_TIMEOUT (slow clients): 408;
- origin-form requests (not proxy requests) and `https://` absolute URIs
  (which would need the proxy to speak TLS): 400 saying to use CONNECT;
- IP-literal targets, in any spelling, only when a CIDR rule covers them;
- the connection's peer must be the run's own sandbox address;
- per run: concurrent connections, total bytes both ways, idle timeout.

Why over ~400 lines: the proxy is the only way out of a sandbox; it is kept
in one file on purpose so it can be reviewed in one sitting.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import structlog

from .accounting import ConnectionEvent, Verdict
from .egress import EgressRules, IPAddress, ip_literal, normalize_host
from .fence import NO_FENCE, Fence
from .guard import classify
from .resolver import ResolveError, Resolver

log = structlog.get_logger("gvisor_mcp.network")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
CHUNK = 256 * 1024
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"te",
    b"trailer",
    b"upgrade",
    b"expect",
}
_HOSTNAME = re.compile(r"^[a-z0-9_.-]{1,253}$")
NOT_ALLOWED = "not in the egress allowlist"


class Refusal(Exception):
    """Ends a client connection with an HTTP error; `verdict` goes to accounting."""

    def __init__(self, status: int, reason: str, verdict: Verdict = "denied") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.verdict = verdict


@dataclass
class Budget:
    """What a run may still use: bytes both ways, connections at once."""

    bytes_left: int
    connections_max: int
    open: int = 0
    exhausted: bool = False

    def spend(self, n: int) -> bool:
        self.bytes_left -= n
        if self.bytes_left < 0:
            self.exhausted = True
        return not self.exhausted


def split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or (with a default) `host` -> (host, port)."""
    if not text or any(c.isspace() for c in text) or "@" in text or "/" in text or "\\" in text:
        raise Refusal(400, f"bad authority {text[:100]!r}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Refusal(400, f"bad authority {text[:100]!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    elif text.count(":") > 1:
        raise Refusal(400, f"IPv6 addresses must be in brackets: {text[:100]!r}")
    else:
        host, _, port_text = text.partition(":")
        if ":" not in text:
            port_text = ""
    if port_text is None or (port_text == "" and default_port is None):
        raise Refusal(400, f"no port in {text[:100]!r}")
    if port_text == "":
        assert default_port is not None
        return normalize_host(host), default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise Refusal(400, f"bad port in {text[:100]!r}")
    return normalize_host(host), int(port_text)


def show_destination(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _phrase(text: str) -> bytes:
    """An HTTP reason phrase: visible ASCII only (pip and curl print it)."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean[:200].encode()


class RunProxy:
    """Serves one run's listener until cancelled."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        run_id: str,
        peer: str,
        rules: EgressRules,
        resolver: Resolver,
        host_addresses: Callable[[], frozenset[IPAddress]],
        on_event: Callable[[ConnectionEvent], Any],
        fence: Callable[[], Fence] = lambda: NO_FENCE,
    ) -> None:
        """`fence`: what no rule opens (fence.py); read at each connection,
        so a node that joins the cluster is fenced off for runs going on."""
        self.listener = listener
        self.run_id = run_id
        self.peer = peer
        self.rules = rules
        self.resolver = resolver
        self.host_addresses = host_addresses
        self.on_event = on_event
        self.fence = fence
        self.budget = Budget(rules.max_bytes, rules.max_connections)
        self.failure: str | None = None
        self.live: dict[int, dict[str, Any]] = {}

    async def serve(self) -> None:
        listener = await anyio.abc.SocketListener.from_socket(self.listener)
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        stream = await listener.accept()
                    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                        return
                    tg.start_soon(self._client, stream)
        except Exception as e:  # the run ends as an error (see service.RunNetwork)
            self.failure = f"egress proxy failed: {type(e).__name__}: {e}"
            log.error("proxy_failed", run_id=self.run_id, error=repr(e))
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()

    # --- one client connection ---------------------------------------------

    async def _client(self, stream: anyio.abc.SocketStream) -> None:
        start = time.monotonic()
        ev: dict[str, Any] = {"destination": "-", "method": "-", "up": 0, "down": 0, "address": None, "start": start}
        verdict: Verdict = "allowed"
        reason: str | None = None
        async with stream:
            remote = stream.extra(anyio.abc.SocketAttribute.remote_address)
            if not isinstance(remote, tuple) or remote[0] != self.peer:
                # Not our sandbox: another run's cannot route here, but never trust that.
                log.warning("proxy_foreign_peer", run_id=self.run_id, peer=str(remote))
                return
            if self.budget.open >= self.budget.connections_max:
                reason = f"too many connections at once (max {self.budget.connections_max})"
                self._emit(ev, "denied", reason, start)
                await self._error(stream, 503, reason)
                return
            self.budget.open += 1
            key = id(ev)
            self.live[key] = ev
            try:
                await self._handle(stream, ev)
                if self.budget.exhausted:
                    verdict, reason = "failed", f"byte limit of {self.rules.max_bytes} bytes reached"
                elif ev.get("idle"):
                    verdict, reason = "allowed", f"closed after {self.rules.idle_timeout:g} s idle"
            except Refusal as r:
                # Accounted before the answer goes out: the command may exit
                # (and its result be read) as soon as it has the answer.
                del self.live[key]
                self._emit(ev, r.verdict, r.reason, start)
                await self._error(stream, r.status, r.reason, ev)
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError) as e:
                if ev["destination"] == "-":
                    self.live.pop(key, None)
                    return  # the client went away before asking for anything
                verdict, reason = "failed", f"connection error: {type(e).__name__}"
            finally:
                self.budget.open -= 1
            self.live.pop(key, None)
            self._emit(ev, verdict, reason, start)

    def in_flight(self) -> list[ConnectionEvent]:
        """Connections still open, as they stand now (connected ones only)."""
        now = time.monotonic()
        return [
            ConnectionEvent(
                run_id=self.run_id,
                destination=ev["destination"],
                verdict="allowed",
                reason=None,
                method=ev["method"],
                address=ev["address"],
                bytes_up=ev["up"],
                bytes_down=ev["down"],
                duration=now - ev.get("start", now),
            )
            for ev in self.live.values()
            if ev.get("address")
        ]

    def _emit(self, ev: dict[str, Any], verdict: Verdict, reason: str | None, start: float) -> None:
        event = ConnectionEvent(
            run_id=self.run_id,
            destination=ev["destination"],
            verdict=verdict,
            reason=reason,
            method=ev["method"],
            address=ev["address"],
            bytes_up=ev["up"],
            bytes_down=ev["down"],
            duration=time.monotonic() - start,
        )
        try:
            self.on_event(event)
        except Exception:
            log.exception("proxy_event_failed", run_id=self.run_id)

    async def _error(
        self, stream: anyio.abc.SocketStream, status: int, reason: str, ev: dict[str, Any] | None = None
    ) -> None:
        dest = ev["destination"] if ev else "-"
        word = "denied" if status == 403 else "error"
        body = (
            f"gvisor-mcp egress proxy: {word} {dest} ({reason})\n".encode()
            if dest != "-"
            else (f"gvisor-mcp egress proxy: {reason}\n".encode())
        )
        head = (
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nX-Gvisor-Mcp-Egress: %s\r\n\r\n"
            % (status, _phrase(f"{word}: {reason}"), len(body), word.encode())
        )
        try:
            with anyio.move_on_after(2):
                await stream.send(head + body)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _read_head(self, stream: anyio.abc.SocketStream, conn: h11.Connection) -> h11.Request:
        raw = b""  # what arrived before the head was complete: checked, not parsed, here
        with anyio.move_on_after(HEAD_TIMEOUT) as scope:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    if e.error_status_hint == 431 or "exceeded" in str(e).lower():
                        raise Refusal(431, f"request head larger than {MAX_HEAD} bytes") from None
                    raise Refusal(400, f"malformed request: {e}") from None
                if isinstance(event, h11.Request):
                    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=len(raw))
                    if end > MAX_HEAD:
                        raise Refusal(431, f"request head larger than {MAX_HEAD} bytes")
                    if b"\n " in raw[:end] or b"\n\t" in raw[:end]:
                        raise Refusal(400, "obsolete line folding in the request head")
                    return event
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive(65536)
                    except anyio.EndOfStream:
                        conn.receive_data(b"")
                        continue
                    if len(raw) <= MAX_HEAD + 4:
                        raw += data[: MAX_HEAD + 4 - len(raw) + 1]
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    raise anyio.EndOfStream
                raise Refusal(400, "unexpected data before the request")
        assert scope.cancelled_caught
        raise Refusal(408, f"request head not received within {HEAD_TIMEOUT:g} s")

    async def _handle(self, stream: anyio.abc.SocketStream, ev: dict[str, Any]) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        req = await self._read_head(stream, conn)
        if self.budget.exhausted:
            raise Refusal(403, f"this run's byte limit of {self.rules.max_bytes} bytes is used up")
        method = req.method.decode("ascii", "replace").upper()
        ev["method"] = method
        target = req.target.decode("ascii", "replace")
        headers = [(k.lower(), v) for k, v in req.headers.raw_items()]
        names = [k for k, _ in headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            raise Refusal(400, "both Content-Length and Transfer-Encoding (refused: request smuggling)")
        if names.count(b"host") > 1:
            raise Refusal(400, "more than one Host header")
        host_header = next((v.decode("ascii", "replace") for k, v in headers if k == b"host"), None)

        if method == "CONNECT":
            host, port = split_authority(target, None)
            ev["destination"] = show_destination(host, port)
            if host_header is not None:
                hh, hp = split_authority(host_header, port)
                if (hh, hp) != (host, port):
                    raise Refusal(400, f"Host header {host_header[:100]!r} does not match CONNECT {target[:100]!r}")
        else:
            url = urlsplit(target)
            if url.scheme.lower() == "https":
                raise Refusal(400, "https:// URLs go through CONNECT (set HTTPS_PROXY, not a plain request)")
            if url.scheme.lower() != "http" or not url.netloc:
                raise Refusal(400, "not a proxy request: use an absolute http:// URI, or CONNECT")
            host, port = split_authority(url.netloc, 80)
            ev["destination"] = show_destination(host, port)
            if host_header is not None:
                hh, hp = split_authority(host_header, 80)
                if (hh, hp) != (host, port):
                    raise Refusal(
                        400, f"Host header {host_header[:100]!r} does not match the URI's {url.netloc[:100]!r}"
                    )

        addresses = await self._decide(host, port)
        upstream = await self._connect(addresses, port, ev)
        async with upstream:
            if method == "CONNECT":
                await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                data, _closed = conn.trailing_data
                if data:
                    await self._send(upstream, data, ev, "up")
            else:
                await self._forward_request(stream, conn, req, url, upstream, ev)
            await self._relay(stream, upstream, ev, both=method == "CONNECT")

    async def _decide(self, host: str, port: int) -> list[IPAddress]:
        """The addresses we may connect to for host:port, or a Refusal (403)."""
        fence = self.fence()
        if (why := fence.port_refused(port)) is not None:
            raise Refusal(403, why)
        literal = ip_literal(host)
        if literal is not None:
            if (why := fence.refused(literal, port)) is not None:
                raise Refusal(403, why)
            if not self.rules.allows_address(literal, port):
                raise Refusal(403, f"{NOT_ALLOWED}: an IP address (allow its CIDR, or use a name)")
            return [literal]
        if not _HOSTNAME.match(host) or ".." in host:
            raise Refusal(400, f"{host[:100]!r} is not a host name")
        if not self.rules.allows_name(host, port):
            raise Refusal(403, NOT_ALLOWED)
        try:
            found = await self.resolver.resolve(host, port, self.rules.hosts)
        except ResolveError as e:
            raise Refusal(502, str(e), "failed") from None
        own = await anyio.to_thread.run_sync(self.host_addresses)
        usable: list[IPAddress] = []
        why = None
        for ip in found:
            if (fenced := fence.refused(ip, port)) is not None:
                why = why or f"resolves to {ip}: {fenced}"
                continue
            if self.rules.allows_address(ip, port):
                usable.append(ip)
                continue
            problem = classify(ip, own)
            if problem is None:
                usable.append(ip)
            elif why is None:
                why = f"resolves to {ip}, {problem} (allow its CIDR explicitly for an internal service)"
        if not usable:
            raise Refusal(403, why or NOT_ALLOWED)
        return usable

    async def _connect(self, addresses: list[IPAddress], port: int, ev: dict[str, Any]) -> anyio.abc.SocketStream:
        last: Exception | None = None
        for ip in addresses[:4]:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    up = await anyio.connect_tcp(str(ip), port)
                ev["address"] = str(ip)
                return up
            except (OSError, TimeoutError) as e:
                last = e
        text = "timed out" if isinstance(last, TimeoutError) else (getattr(last, "strerror", None) or str(last))
        raise Refusal(502, f"could not connect ({text})", "failed")

    async def _send(self, to: anyio.abc.SocketStream, data: bytes, ev: dict[str, Any], key: str) -> None:
        ev[key] += len(data)
        if not self.budget.spend(len(data)):
            raise anyio.BrokenResourceError
        await to.send(data)

    async def _forward_request(
        self,
        client: anyio.abc.SocketStream,
        conn: h11.Connection,
        req: h11.Request,
        url: Any,
        upstream: anyio.abc.SocketStream,
        ev: dict[str, Any],
    ) -> None:
        """Re-serialise the request (origin-form, `Connection: close`) and its body."""
        drop = set(HOP_BY_HOP)
        for k, v in req.headers.raw_items():
            if k.lower() == b"connection":
                drop.update(t.strip().lower() for t in v.split(b","))
        headers = [(k, v) for k, v in req.headers.raw_items() if k.lower() not in drop and k.lower() != b"host"]
        headers = [(b"Host", url.netloc.encode()), *headers, (b"Connection", b"close")]
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        out = h11.Connection(h11.CLIENT)
        try:
            await self._send(
                upstream, out.send(h11.Request(method=req.method, target=path.encode(), headers=headers)), ev, "up"
            )
        except h11.LocalProtocolError as e:
            raise Refusal(400, f"malformed request: {e}") from None
        expect = any(k.lower() == b"expect" and v.lower() == b"100-continue" for k, v in req.headers.raw_items())
        if expect:
            await client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise Refusal(400, f"malformed request body: {e}") from None
            if event is h11.NEED_DATA:
                with anyio.fail_after(self.rules.idle_timeout):
                    try:
                        data = await client.receive(CHUNK)
                    except anyio.EndOfStream:
                        data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                await self._send(upstream, out.send(event), ev, "up")
            elif isinstance(event, h11.EndOfMessage):
                await self._send(upstream, out.send(event), ev, "up")
                return
            else:
                raise Refusal(400, "request body ended early")

    async def _relay(
        self, client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream, ev: dict[str, Any], *, both: bool
    ) -> None:
        """Bytes both ways (a tunnel) or upstream -> client only (a forwarded
        request's response), until both directions end, the byte budget runs
        out or nothing moved either way for idle_timeout seconds."""
        idle = self.rules.idle_timeout
        last = [time.monotonic()]

        async def pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, key: str, tg: Any) -> None:
            while True:
                with anyio.move_on_after(max(0.0, last[0] + idle - time.monotonic())) as scope:
                    try:
                        data = await src.receive(CHUNK)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        data = b""
                if scope.cancelled_caught:
                    if time.monotonic() - last[0] >= idle:
                        ev["idle"] = True
                        tg.cancel_scope.cancel()
                        return
                    continue
                if not data:
                    try:
                        await dst.send_eof()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    return
                last[0] = time.monotonic()
                try:
                    await self._send(dst, data, ev, key)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    tg.cancel_scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(pipe, upstream, client, "down", tg)
            if both:
                tg.start_soon(pipe, client, upstream, "up", tg)
