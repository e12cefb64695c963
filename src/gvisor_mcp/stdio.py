"""stdio for the MCP channel, with a stdin reader that can be cancelled.

Why not the SDK's own: `mcp.server.stdio.stdio_server()` reads stdin in a
worker thread, and a thread blocked in read() cannot be cancelled. On SIGTERM
the server then cleaned up its sandboxes but never exited while the client
kept stdin open (found by tests/protocol/test_lifecycle.py). Here stdin is
read without blocking (anyio.wait_readable + os.read), so cancelling the
server returns at once.

Lines that are not valid JSON-RPC, or too long, get a JSON-RPC error answer
here (the SDK would drop them silently and the client would wait forever).

Like the SDK, fd 0 and fd 1 are diverted while serving (fd 0 to /dev/null,
fd 1 to stderr), so nothing else in the process can read MCP input or write
stray bytes into the MCP output.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types
import structlog
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage

from . import startup
from .asgi import serve_metrics
from .config import ServeConfig
from .lifecycle import Signals
from .progress import MAX_PROGRESS_TOKEN, progress_token_problem  # noqa: F401  (MAX_: re-exported)
from .runtime import PolicyHolder, TenantState, start_runtime
from .server import build_server

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602

log = structlog.get_logger("gvisor_mcp.stdio")

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
"""A line longer than this is refused and dropped as it arrives, never held whole.

The largest request the policy can accept is a 4 MiB stdin plus 1 MiB of
argv and the env; even JSON-escaped that fits in 32 MiB."""


_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')


def head_id(data: bytes) -> int | str | None:
    """The JSON-RPC id near the start of a line we could not decode, if any."""
    m = _ID.search(data[:4096])
    if m is None:
        return None
    try:
        return json.loads(m.group(1))
    except ValueError:
        return None


class LineReader:
    """Async iterator over the JSON-RPC messages of a file descriptor, cancellable.

    Each line is parsed once, here, straight from the bytes read (the SDK's
    own stdin reader decoded it, and we had validated it before that: three
    copies and two parses of every line; a 50 MB line raised the server's
    memory by ~200 MiB). What is yielded is the parsed message.

    A line that is not a valid JSON-RPC message (bad JSON, a lone surrogate
    escape, an id that is neither a string nor an integer, an over-long
    progress token) or that is longer than `max_line` is answered here with
    a JSON-RPC error, so a client never waits forever for it; the SDK only
    sees valid messages. An over-long line is dropped while it arrives: at
    most `max_line` bytes of it are ever held.
    """

    def __init__(self, fd: int, reject: Any = None, max_line: int = MAX_MESSAGE_BYTES) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._scanned = 0
        """Bytes of _buf known to hold no newline (each byte is searched once)."""
        self._max = max_line
        self._skipping = False
        self._reject = reject
        self._eof = False
        os.set_blocking(fd, False)

    async def _refuse(self, request_id: Any, code: int, message: str) -> None:
        log.error("stdin_message_refused", reason=message[:500])
        if self._reject is not None:
            await self._reject(request_id, code, message)

    def __aiter__(self) -> LineReader:
        return self

    def _take_line(self) -> bytearray | None:
        nl = self._buf.find(b"\n", self._scanned)
        if nl < 0:
            self._scanned = len(self._buf)
            return None
        if nl == len(self._buf) - 1:  # the usual case: the line is all we hold, no copy
            line, self._buf = self._buf, bytearray()
        else:
            line = self._buf[: nl + 1]
            del self._buf[: nl + 1]
        self._scanned = 0
        return line

    async def __anext__(self) -> Any:
        while True:
            line = self._take_line()
            if line is not None:
                if self._skipping:
                    self._skipping = False
                    continue
                if not line.strip():
                    continue
                message = await self._parse(line)
                if message is not None:
                    return message
                continue
            if len(self._buf) > self._max:
                if not self._skipping:
                    await self._refuse(
                        head_id(bytes(self._buf[:4096])),
                        INVALID_REQUEST,
                        f"message longer than {self._max} bytes; send less",
                    )
                self._skipping = True
                self._buf = bytearray()
                self._scanned = 0
            await anyio.wait_readable(self._fd)
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if not self._eof:
                    self._eof = True
                    log.info("stdin_closed")
                if self._buf and not self._skipping:
                    self._buf += b"\n"  # the last line, without its newline
                    continue
                raise StopAsyncIteration
            self._buf += chunk

    async def _parse(self, line: bytearray) -> Any:
        """The message, or None once the client was answered with an error."""
        try:
            message = _message_adapter().validate_json(line, by_name=False)
        except ValueError as e:
            await self._refuse(
                head_id(bytes(line[:4096])), PARSE_ERROR, f"not a valid JSON-RPC message: {str(e)[:300]}"
            )
            return None
        if isinstance(message, mcp_types.JSONRPCNotification) and b'"id"' in line:
            # A request whose id is not a string or an integer (an object, a
            # list, a float, null, a boolean) validates as a notification, and
            # would never be answered. Rare: only then is the line read again.
            problem = _bad_id(line)
            if problem is not None:
                await self._refuse(None, INVALID_REQUEST, problem)
                return None
        if isinstance(message, mcp_types.JSONRPCRequest):
            problem = progress_token_problem(message.params)
            if problem is not None:
                await self._refuse(message.id, INVALID_PARAMS, problem)
                return None
        return message


def _bad_id(line: bytearray) -> str | None:
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict) or "id" not in raw:
        return None
    kind = {
        dict: "an object",
        list: "a list",
        float: "a number with a fraction",
        bool: "a boolean",
        type(None): "null",
    }.get(type(raw["id"]), type(raw["id"]).__name__)
    return (
        f'invalid request: "id" is {kind}; JSON-RPC request ids here must be a string or an integer. '
        "Send the request again with such an id (or without one, as a notification)"
    )


def _message_adapter() -> Any:
    return mcp_types.jsonrpc_message_adapter


def write_all(fd: int, data: bytes) -> None:
    """Every byte of `data` to `fd`, however many writes that takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class WireOut:
    """The copy of fd 1 the answers go to, written whole, in a worker thread.

    A write to a full pipe can end short: a signal or a ptrace stop (py-spy,
    a debugger, a SIGSTOP) that arrives while write(2) waits makes it return
    what it wrote so far. The TextIOWrapper over an unbuffered file this
    replaces dropped the rest: in the 10,000-call soak one answer lost
    everything after its first 65,536 bytes (the pipe's size), the next
    message ran on in the same line, the client could not parse it, and that
    call waited for its answer forever.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def write(self, text: str) -> None:
        await anyio.to_thread.run_sync(write_all, self.fd, text.encode())

    async def flush(self) -> None:
        """Nothing is buffered here."""

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class LockedWriter:
    """The MCP output: whole lines, one writer at a time (the SDK's writer
    task and LineReader's error answers share it)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._lock = anyio.Lock()
        self.client_gone = False

    async def write(self, text: str) -> None:
        async with self._lock:
            if self.client_gone:
                return
            try:
                await self._file.write(text)
            except (BrokenPipeError, ConnectionResetError):
                self._gone()

    async def flush(self) -> None:
        async with self._lock:
            if self.client_gone:
                return
            try:
                await self._file.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._gone()

    def _gone(self) -> None:
        """The client closed its end: nothing written from now on can be read.

        Seen in the 10,000-call soak: the client went away mid-run and the
        server died with a BrokenPipeError traceback out of its task group,
        leaving runs to the crash reaper. Dropping the output instead lets the
        server end as on stdin EOF, with its normal cleanup.
        """
        self.client_gone = True
        log.info("stdio_client_gone", reason="stdout closed by the client; answers from now on are dropped")

    async def aclose(self) -> None:
        try:
            await self._file.aclose()
        except (BrokenPipeError, ConnectionResetError):
            self._gone()

    async def error(self, request_id: int | str | None, code: int, message: str) -> None:
        body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
        await self.write(json.dumps(body) + "\n")


@asynccontextmanager
async def claimed_stdio() -> AsyncIterator[tuple[LineReader, Any]]:
    """(stdin lines, async stdout) on private copies of fd 0 and fd 1."""
    wire_in = os.dup(0)
    wire_out = os.dup(1)
    saved_in, saved_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    out = WireOut(wire_out)
    writer = LockedWriter(out)
    try:
        yield LineReader(wire_in, writer.error), writer
    finally:
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        for fd in (saved_in, saved_out, wire_in):
            os.close(fd)
        out.close()


def serve(config: ServeConfig) -> int:
    """`gvisor-mcp serve` (stdio): start-up checks, then one tenant until stdin ends."""
    return startup.serve(config, _serve)


async def _serve(config: ServeConfig, policy: PolicyHolder, signals: Signals) -> None:
    @asynccontextmanager
    async def lifespan(_server: MCPServer[TenantState]) -> AsyncIterator[TenantState]:
        """The runtime, for this process's one tenant (and --metrics-port beside it)."""
        async with start_runtime(config, policy) as rt, anyio.create_task_group() as side:
            if config.metrics_port:
                side.start_soon(serve_metrics, rt.metrics, config.metrics_port)
            app = rt.app_for(config.tenant)
            app.warm_pool()
            policy.listeners.append(app.warm_pool)
            try:
                yield app
            finally:
                policy.listeners.remove(app.warm_pool)
                side.cancel_scope.cancel()

    server = build_server(config, policy, config.tenant, lifespan)
    # serve_stdio returns when stdin ends; a stop signal cancels it. Either
    # way the lifespan (start_runtime()) cleans up, shielded, before this returns.
    await signals.guard(lambda: serve_stdio(server), on_reload=policy.reload)


async def serve_stdio(server: MCPServer[Any]) -> None:
    """Run an MCPServer on the claimed stdio until stdin ends or we are cancelled.

    The SDK's `stdio_server()` parses each line itself; here LineReader has
    parsed it already, so the messages go to the server as they are.
    """
    lowlevel = server._lowlevel_server
    async with claimed_stdio() as (stdin, stdout):
        to_server, from_stdin = anyio.create_memory_object_stream[Any](0)
        to_stdout, from_server = anyio.create_memory_object_stream[Any](0)

        async def read() -> None:
            async with to_server:
                async for message in stdin:
                    await to_server.send(SessionMessage(message))

        written = anyio.Event()

        async def write() -> None:
            try:
                async with from_server:
                    async for session_message in from_server:
                        await stdout.write(
                            session_message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                        )
            finally:
                written.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(write)
            async with to_stdout, from_stdin:
                # MCPServer.run_stdio_async() runs the same, on the SDK's stdio.
                await lowlevel.run(from_stdin, to_stdout, lowlevel.create_initialization_options())
            await written.wait()  # the server's last answers are out; then reading stops
            tg.cancel_scope.cancel()
