"""stdio for the MCP channel, with a stdin reader that can be cancelled.

Why not the SDK's own: `mcp.server.stdio.stdio_server()` reads stdin in a
worker thread, and a thread blocked in read() cannot be cancelled. On SIGTERM
the server then cleaned up its sandboxes but never exited while the client
kept stdin open (found by tests/protocol/test_lifecycle.py). Here stdin is
read without blocking (anyio.wait_readable + os.read), so cancelling the
server returns at once.

Like the SDK, fd 0 and fd 1 are diverted while serving (fd 0 to /dev/null,
fd 1 to stderr), so nothing else in the process can read MCP input or write
stray bytes into the MCP output.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import TextIOWrapper
from typing import Any

import anyio
import structlog

log = structlog.get_logger("gvisor_mcp.stdio")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""A line longer than this is dropped (and logged), not buffered without end."""


class LineReader:
    """Async iterator over the text lines of a file descriptor, cancellable."""

    def __init__(self, fd: int, max_line: int = MAX_MESSAGE_BYTES) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._max = max_line
        self._skipping = False
        os.set_blocking(fd, False)

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
                return line.decode("utf-8", errors="replace")
            if len(self._buf) > self._max:
                if not self._skipping:
                    log.error("stdin_message_too_large", limit=self._max)
                self._skipping = True
                self._buf.clear()
            await anyio.wait_readable(self._fd)
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if self._buf and not self._skipping:
                    rest = bytes(self._buf)
                    self._buf.clear()
                    return rest.decode("utf-8", errors="replace")
                raise StopAsyncIteration
            self._buf += chunk


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
    try:
        yield LineReader(wire_in), anyio.wrap_file(out)
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
