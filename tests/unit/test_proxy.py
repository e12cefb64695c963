"""The egress proxy's request handling, attacked over loopback.

The proxy under test listens on 127.0.0.1 and its only upstream is a
recording HTTP/echo server on 127.0.0.1 (reached through the explicit CIDR
rule 127.0.0.0/8 for that one port). Every denial test also checks that the
upstream saw nothing: a refused request must never leave the proxy.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import anyio
import pytest

from gvisor_mcp.network import proxy as proxy_mod
from gvisor_mcp.network.accounting import ConnectionEvent
from gvisor_mcp.network.egress import EgressRules
from gvisor_mcp.network.proxy import RunProxy
from gvisor_mcp.network.resolver import Resolver

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Upstream:
    """Answers every request with `body` and closes; echoes after a CONNECT."""

    def __init__(self, body: bytes = b"hello from upstream") -> None:
        self.body = body
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def handle(self, stream) -> None:
        self.connections += 1
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive()
                    data += chunk
                    if data.startswith(b"ECHO"):
                        break
                if data.startswith(b"ECHO"):  # tunnel test: echo until EOF
                    while True:
                        await stream.send(data)
                        data = await stream.receive()
                head, _, rest = data.partition(b"\r\n\r\n")
                low = head.lower()
                if b"content-length:" in low:
                    n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(rest) < n:
                        rest += await stream.receive()
                elif b"transfer-encoding: chunked" in low:
                    while not rest.endswith(b"0\r\n\r\n"):
                        rest += await stream.receive()
                self.requests.append(head + b"\r\n\r\n" + rest)
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(self.body), self.body)
                )
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass


@asynccontextmanager
async def setup(rules: EgressRules | None = None, *, peer: str = "127.0.0.1", body: bytes = b"hello from upstream"):
    up = Upstream(body)
    events: list[ConnectionEvent] = []
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        up.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.start_soon(listener.serve, up.handle)
        if rules is None:
            rules = EgressRules(
                allow=[
                    "up.test",
                    {"domain": "up.test", "ports": [up.port]},
                    {"cidr": "127.0.0.0/8", "ports": [up.port]},
                    "local.test",
                ],
                hosts={"up.test": "127.0.0.1", "local.test": "127.0.0.1"},
            )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        proxy = RunProxy(
            sock,
            run_id="run-1",
            peer=peer,
            rules=rules,
            resolver=Resolver(system_dns=False),
            host_addresses=lambda: frozenset(),
            on_event=events.append,
        )
        tg.start_soon(proxy.serve)
        try:
            yield up, port, events, proxy
        finally:
            tg.cancel_scope.cancel()


async def exchange(port: int, data: bytes, *, wait: float = 10.0) -> bytes:
    """Send `data` to the proxy; everything it answers until it closes."""
    out = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as s:
        await s.send(data)
        with anyio.fail_after(wait):
            while True:
                try:
                    out += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return out


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def settle(events: list, n: int = 1) -> None:
    with anyio.fail_after(10):
        while len(events) < n:
            await anyio.sleep(0.01)


async def test_absolute_uri_is_forwarded_in_origin_form():
    async with setup() as (up, port, events, _):
        r = await exchange(
            port,
            (
                b"GET http://up.test:%d/hello?x=1 HTTP/1.1\r\nHost: up.test:%d\r\nProxy-Connection: keep-alive\r\n"
                b"X-Mine: yes\r\n\r\n" % (up.port, up.port)
            ),
        )
        await settle(events)
    assert status(r) == 200 and r.endswith(b"hello from upstream")
    (req,) = up.requests
    assert req.startswith(b"GET /hello?x=1 HTTP/1.1\r\n")
    assert b"host: up.test:%d" % up.port in req.lower()
    assert b"connection: close" in req.lower() and b"proxy-connection" not in req.lower()
    assert b"x-mine: yes" in req.lower()
    (ev,) = events
    assert (ev.destination, ev.verdict, ev.method) == (f"up.test:{up.port}", "allowed", "GET")
    assert ev.bytes_down == len(r) and ev.bytes_up > 0 and ev.address == "127.0.0.1"


async def test_connect_tunnel_carries_bytes_both_ways_including_early_data():
    async with setup() as (up, port, events, _):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"CONNECT up.test:%d HTTP/1.1\r\nHost: up.test:%d\r\n\r\nECHO-early" % (up.port, up.port))
            got = b""
            with anyio.fail_after(10):
                while b"ECHO-early" not in got:
                    got += await s.receive()
                assert got.startswith(b"HTTP/1.1 200 ")
                await s.send(b"ping")
                got = b""
                while b"ping" not in got:
                    got += await s.receive()
        await settle(events)
    assert events[0].verdict == "allowed" and events[0].method == "CONNECT"
    assert events[0].bytes_up >= len(b"ECHO-earlyping")


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"evil.example:443", b"not in the egress allowlist"),
        (b"203.0.113.5:443", b"an IP address"),
        (b"[2001:db8::1]:443", b"an IP address"),
        (b"[::ffff:127.0.0.1]:443", b"an IP address"),
        (b"2130706433:443", b"an IP address"),  # 127.0.0.1 spelled as one number
        (b"0x7f.1:443", b"an IP address"),
        (b"169.254.169.254:80", b"an IP address"),
        (b"up.test:22", b"not in the egress allowlist"),  # allowed name, other port
    ],
)
async def test_connect_refusals_never_reach_upstream(target, reason):
    async with setup() as (up, port, events, _):
        r = await exchange(port, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
        await settle(events)
    assert status(r) == 403 and reason in r, r
    assert up.connections == 0
    assert events[0].verdict == "denied" and events[0].destination == target.decode().lower()


async def test_name_resolving_to_loopback_is_refused_without_its_cidr():
    rules = EgressRules(allow=["local.test"], hosts={"local.test": "127.0.0.1"})
    async with setup(rules) as (up, port, events, _):
        r = await exchange(port, b"GET http://local.test/ HTTP/1.1\r\nHost: local.test\r\n\r\n")
        await settle(events)
    assert status(r) == 403 and b"resolves to 127.0.0.1, a loopback address" in r
    assert up.connections == 0


async def test_host_header_disagreeing_with_connect_is_refused():
    async with setup() as (up, port, events, _):
        r = await exchange(port, b"CONNECT up.test:%d HTTP/1.1\r\nHost: evil.example:443\r\n\r\n" % up.port)
        r2 = await exchange(port, b"GET http://up.test:%d/ HTTP/1.1\r\nHost: evil.example\r\n\r\n" % up.port)
        r3 = await exchange(
            port,
            b"GET http://up.test:%d/ HTTP/1.1\r\nHost: up.test:%d\r\nHost: evil.example\r\n\r\n" % (up.port, up.port),
        )
    assert status(r) == 400 and b"does not match" in r
    assert status(r2) == 400 and b"does not match" in r2
    assert status(r3) == 400
    assert up.connections == 0


@pytest.mark.parametrize(
    "request_bytes",
    [
        # CL.TE and TE.CL: both framings at once
        b"POST http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://evil.example/ HTTP/1.1\r\n\r\n",
        # two different lengths
        b"POST http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nContent-Length: 4\r\n"
        b"Content-Length: 40\r\n\r\nabcd",
        # an encoding the proxy does not frame
        b"POST http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n",
        # obsolete line folding
        b"GET http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nX-A: 1\r\n  folded\r\n\r\n",
        # space before the colon
        b"GET http://up.test:{p}/ HTTP/1.1\r\nHost: up.test:{p}\r\nContent-Length : 5\r\n\r\nhello",
    ],
    ids=["cl-and-te", "two-lengths", "te-not-chunked", "obs-fold", "space-before-colon"],
)
async def test_smuggling_shapes_are_refused(request_bytes):
    async with setup() as (up, port, events, _):
        data = request_bytes.replace(b"{p}", str(up.port).encode())
        r = await exchange(port, data)
    assert status(r) == 400, r
    assert up.connections == 0


async def test_pipelined_second_request_is_never_forwarded():
    async with setup() as (up, port, events, _):
        r = await exchange(
            port,
            (
                b"GET http://up.test:{p}/a HTTP/1.1\r\nHost: up.test:{p}\r\n\r\n"
                b"GET http://evil.example/b HTTP/1.1\r\nHost: evil.example\r\n\r\n"
            ).replace(b"{p}", str(up.port).encode()),
        )
        await settle(events)
    assert status(r) == 200
    assert len(up.requests) == 1 and b"evil" not in up.requests[0]
    assert len(events) == 1


async def test_chunked_body_is_reframed_not_passed_raw():
    async with setup() as (up, port, events, _):
        r = await exchange(
            port,
            (
                b"POST http://up.test:{p}/up HTTP/1.1\r\nHost: up.test:{p}\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n0\r\n\r\n"
            ).replace(b"{p}", str(up.port).encode()),
        )
    assert status(r) == 200
    (req,) = up.requests
    assert req.endswith(b"5\r\nhello\r\n0\r\n\r\n") and b"ext=1" not in req


async def test_oversized_head_gets_431():
    async with setup() as (up, port, events, _):
        r = await exchange(
            port, b"GET http://up.test/ HTTP/1.1\r\nHost: up.test\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        )
    assert status(r) == 431
    assert up.connections == 0


async def test_slow_client_gets_408(monkeypatch):
    monkeypatch.setattr(proxy_mod, "HEAD_TIMEOUT", 0.5)
    async with setup() as (up, port, events, _):
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"GET http://up.test/ HTTP/1.1\r\nHost: up")  # ...and never the rest
            got = b""
            with anyio.fail_after(10):
                while True:
                    try:
                        got += await s.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
    assert status(got) == 408
    assert up.connections == 0


@pytest.mark.parametrize(
    "request_bytes, needle",
    [
        (b"GET /hello HTTP/1.1\r\nHost: up.test\r\n\r\n", b"not a proxy request"),
        (b"GET https://up.test/ HTTP/1.1\r\nHost: up.test\r\n\r\n", b"CONNECT"),
        (b"GET http://up.test@evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", b"bad authority"),
        (b"GET ftp://up.test/ HTTP/1.1\r\nHost: up.test\r\n\r\n", b"not a proxy request"),
        (b"CONNECT up.test HTTP/1.1\r\nHost: up.test\r\n\r\n", b"no port"),
        (b"CONNECT 2001:db8::1:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"brackets"),
    ],
)
async def test_requests_that_are_not_proxy_requests(request_bytes, needle):
    async with setup() as (up, port, events, _):
        r = await exchange(port, request_bytes)
    assert status(r) == 400 and needle in r, r
    assert up.connections == 0


async def test_connection_limit():
    rules = EgressRules(allow=[{"domain": "up.test", "ports": [1]}], hosts={"up.test": "127.0.0.1"}, max_connections=1)
    async with setup(rules) as (up, port, events, _):
        rules2 = rules.model_copy(
            update={
                "allow": EgressRules(
                    allow=[{"domain": "up.test", "ports": [up.port]}, {"cidr": "127.0.0.1/32", "ports": [up.port]}]
                ).allow
            }
        )
        _.rules = rules2
        async with await anyio.connect_tcp("127.0.0.1", port) as held:
            await held.send(b"CONNECT up.test:%d HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
            with anyio.fail_after(10):
                assert (await held.receive()).startswith(b"HTTP/1.1 200")
            r = await exchange(port, b"CONNECT up.test:%d HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
    assert status(r) == 503 and b"too many connections" in r


async def test_byte_limit_cuts_the_run_off():
    body = b"x" * 200_000
    async with setup(body=body) as (up, port, events, proxy):
        proxy.budget.bytes_left = 50_000
        r = await exchange(port, b"GET http://up.test:%d/ HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
        await settle(events)
        r2 = await exchange(port, b"GET http://up.test:%d/ HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
        await settle(events, 2)
    assert len(r) < len(body)
    assert events[0].verdict == "failed" and "byte limit" in events[0].reason
    assert status(r2) == 403 and b"byte limit" in r2


async def test_idle_tunnel_is_closed():
    async with setup() as (up, port, events, proxy):
        proxy.rules = proxy.rules.model_copy(update={"idle_timeout": 0.3})
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"CONNECT up.test:%d HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
            with anyio.fail_after(10):
                assert (await s.receive()).startswith(b"HTTP/1.1 200")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    while True:
                        await s.receive()
        await settle(events)
    assert "idle" in events[0].reason


async def test_foreign_peer_gets_nothing():
    async with setup(peer="127.0.0.2") as (up, port, events, _):
        r = await exchange(port, b"CONNECT up.test:%d HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
    assert r == b"" and up.connections == 0


@pytest.mark.parametrize(
    "target, reason",
    [
        # The upstream is on a fenced node: refused although a CIDR rule and a name allow it.
        (b"up.test:{port}", b"resolves to 127.0.0.1: 127.0.0.1 is a node of the Ray cluster"),
        (b"127.0.0.1:{port}", b"127.0.0.1 is a node of the Ray cluster"),
        (b"[::ffff:127.0.0.1]:{port}", b"is a node of the Ray cluster"),
        # A fenced port, on any address, before any name is resolved.
        (b"up.test:6379", b"port 6379 is one of the Ray cluster's ports"),
    ],
)
async def test_the_fence_wins_over_every_rule(target, reason):
    """A cluster agent fences off node addresses and Ray's ports (network/fence.py)."""
    from gvisor_mcp.network.fence import Fence

    async with setup() as (up, port, events, proxy):
        rules = proxy.rules.model_copy(
            update={
                "allow": (
                    *proxy.rules.allow,
                    *EgressRules(allow=[{"cidr": "::ffff:0:0/96", "ports": [up.port]}, "up.test:6379"]).allow,
                )
            }
        )
        proxy.rules = rules
        proxy.fence = lambda: Fence(networks=["127.0.0.1/32"], ports=frozenset({6379}))
        t = target.replace(b"{port}", str(up.port).encode())
        r = await exchange(port, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (t, t))
        await settle(events)
    assert status(r) == 403 and reason in r, r
    assert up.connections == 0
    assert events[0].verdict == "denied"


async def test_an_unfenced_address_still_passes_with_a_fence():
    from gvisor_mcp.network.fence import Fence

    async with setup() as (up, port, events, proxy):
        proxy.fence = lambda: Fence(networks=["10.9.0.0/16"], ports=frozenset({6379}))
        r = await exchange(port, b"GET http://up.test:%d/ HTTP/1.1\r\nHost: up.test:%d\r\n\r\n" % (up.port, up.port))
        await settle(events)
    assert status(r) == 200 and up.connections == 1
