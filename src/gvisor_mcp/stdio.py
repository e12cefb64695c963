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
from io import TextIOWrapper
from typing import Any

import anyio
import structlog

log = structlog.get_logger("gvisor_mcp.stdio")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""A line longer than this is dropped (and logged), not buffered without end."""


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
    """Async iterator over the JSON-RPC lines of a file descriptor, cancellable.

    A line that is not a valid JSON-RPC message (bad JSON, a lone surrogate
    escape) or that is longer than `max_line` is answered here with a
    JSON-RPC error for the id at its head, so a client never waits forever
    for it; the SDK then only sees valid messages.
    """

    def __init__(self, fd: int, reject: Any = None, max_line: int = MAX_MESSAGE_BYTES) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._max = max_line
        self._skipping = False
        self._reject = reject
        self._eof = False
        os.set_blocking(fd, False)

    async def _refuse(self, data: bytes, code: int, message: str) -> None:
        log.error("stdin_message_refused", reason=message)
        if self._reject is not None:
            await self._reject(head_id(data), code, message)

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                if self._skipping:
                    self._skipping = False
                    continue
                if not line.strip():
                    continue
                text = line.decode("utf-8", errors="replace")
                try:
                    _message_adapter().validate_json(text, by_name=False)
                except ValueError as e:
                    await self._refuse(line, PARSE_ERROR, f"not a valid JSON-RPC message: {str(e)[:300]}")
                    continue
                return text
            if len(self._buf) > self._max:
                if not self._skipping:
                    await self._refuse(bytes(self._buf[:4096]), INVALID_REQUEST,
                                       f"message longer than {self._max} bytes; send less")
                self._skipping = True
                self._buf.clear()
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


PARSE_ERROR = -32700
INVALID_REQUEST = -32600


def _message_adapter() -> Any:
    import mcp_types

    return mcp_types.jsonrpc_message_adapter


class LockedWriter:
    """The MCP output: whole lines, one writer at a time (the SDK's writer
    task and LineReader's error answers share it)."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._lock = anyio.Lock()

    async def write(self, text: str) -> None:
        async with self._lock:
            await self._file.write(text)

    async def flush(self) -> None:
        async with self._lock:
            await self._file.flush()

    async def aclose(self) -> None:
        await self._file.aclose()

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
    out = TextIOWrapper(os.fdopen(wire_out, "wb", buffering=0), encoding="utf-8", write_through=True)
    writer = LockedWriter(anyio.wrap_file(out))
    try:
        yield LineReader(wire_in, writer.error), writer
    finally:
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        for fd in (saved_in, saved_out, wire_in):
            os.close(fd)
        out.close()


async def serve_stdio(server: Any) -> None:
    """Run an MCPServer on the claimed stdio until stdin ends or we are cancelled."""
    from mcp.server.stdio import stdio_server

    async with claimed_stdio() as (stdin, stdout), stdio_server(stdin=stdin, stdout=stdout) as (read, write):
        # MCPServer.run_stdio_async() does exactly this with the SDK's own stdio.
        lowlevel = server._lowlevel_server
        await lowlevel.run(read, write, lowlevel.create_initialization_options())
