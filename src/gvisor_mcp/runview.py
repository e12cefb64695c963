"""`gvisor-mcp run`'s status line: elapsed time and bytes so far, while a command runs.

A long run used to show nothing until it ended (issue 15). When stderr is a
terminal, a line there is redrawn in place about twice a second:

    gvisor-mcp: running 12.5s, stdout 3.1 KiB, stderr 0 B

It is a terminal nicety only: with stderr redirected (a file, a pipe, a
test) nothing extra is written, so stderr holds exactly the command's own
stderr and the summary line, as before. The line is erased before any of
the command's output reaches the terminal and is drawn only at the start of
a line, so it never splits or overwrites what the command wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import BinaryIO, TypeVar

import anyio

T = TypeVar("T")

ERASE = b"\r\x1b[K"
INTERVAL = 0.5


def human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _is_terminal(stream: BinaryIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False


class RunView:
    """Counts what the command writes and, on a terminal, shows it while it runs."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO) -> None:
        self.out, self.err = stdout, stderr
        self.shown = _is_terminal(stderr)
        # stdout shares the screen only if it is a terminal too; then it also
        # moves the cursor and must erase the status line first.
        self.out_on_screen = self.shown and _is_terminal(stdout)
        self.out_bytes = self.err_bytes = 0
        self.started = time.monotonic()
        self.drawn = False
        self.at_line_start = True

    def writer(self, which: str) -> Callable[[bytes], None]:
        stream = self.out if which == "stdout" else self.err
        on_screen = self.out_on_screen if which == "stdout" else self.shown

        def write(chunk: bytes) -> None:
            if which == "stdout":
                self.out_bytes += len(chunk)
            else:
                self.err_bytes += len(chunk)
            if on_screen:
                self.erase()
                if chunk:
                    self.at_line_start = chunk.endswith(b"\n")
            stream.write(chunk)
            stream.flush()

        return write

    def line(self) -> bytes:
        elapsed = time.monotonic() - self.started
        return (
            f"gvisor-mcp: running {elapsed:.1f}s, stdout {human(self.out_bytes)}, stderr {human(self.err_bytes)}"
        ).encode()

    def draw(self) -> None:
        if not self.shown or not self.at_line_start:
            return
        self.err.write(ERASE + self.line())
        self.err.flush()
        self.drawn = True

    def erase(self) -> None:
        if self.drawn:
            self.err.write(ERASE)
            self.err.flush()
            self.drawn = False

    async def refresh(self) -> None:
        """Redraw until cancelled; a no-op when stderr is not a terminal."""
        if not self.shown:
            return
        try:
            while True:
                await anyio.sleep(INTERVAL)
                self.draw()
        finally:
            self.erase()

    async def while_running(self, work: Callable[[], Awaitable[T]]) -> T:
        """`await work()` with the line refreshed meanwhile; its exception comes out as itself, not in a group."""
        if not self.shown:
            return await work()
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.refresh)
            try:
                result = await work()
            except Exception as e:
                error = e
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result
