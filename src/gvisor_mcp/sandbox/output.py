"""A run's streams: bounded capture of its output, the pumps that fill it,
and the feeder of its stdin.

The host process must not grow with what a command prints (a `yes` or a
/dev/urandom flood), so the middle is dropped as it arrives; chunks still go
to the caller's writer as they come, for streaming and spill files.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import Any

import anyio
import anyio.abc


class BoundedCapture:
    """Keeps the first `limit // 2` bytes and the last `limit - limit // 2`.

    When the stream fits in `limit`, `value()` is the stream exactly.
    """

    def __init__(self, limit: int, writer: Callable[[bytes], Any] | None = None) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self.total = 0
        self._writer = writer
        self._head_cap = limit // 2
        self.tail_cap = limit - self._head_cap
        self.skipped = 0
        """Bytes counted but never seen (outfile.py, past the limit)."""
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    async def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.total += len(chunk)
        if self._writer is not None:
            ret = self._writer(chunk)
            if inspect.isawaitable(ret):
                await ret
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
            if not chunk:
                return
        if self.tail_cap == 0:
            return
        if len(chunk) >= self.tail_cap:
            self._tail.clear()
            self._tail.append(chunk[-self.tail_cap :])
            self._tail_len = self.tail_cap
            return
        self._tail.append(chunk)
        self._tail_len += len(chunk)
        # Drop whole chunks while the rest still covers the tail.
        while self._tail_len - len(self._tail[0]) >= self.tail_cap:
            self._tail_len -= len(self._tail.popleft())

    @property
    def head_cap(self) -> int:
        return self._head_cap

    @property
    def head_len(self) -> int:
        return len(self._head)

    @property
    def has_writer(self) -> bool:
        return self._writer is not None

    @property
    def can_skip(self) -> bool:
        """Whether bytes may go unread (skip): not when the writer wants
        every byte (accepts_skips)."""
        return accepts_skips(self._writer)

    def skip(self, n: int) -> None:
        """`n` bytes came that will not be read (an output file past the
        head; outfile.py): counted, and told to the writer if it takes skips (see
        accepts_skips); set_tail must give the exact tail before value()."""
        if n <= 0:
            return
        if len(self._head) < self._head_cap:
            raise ValueError("bytes may be skipped only once the head is full")
        self.total += n
        self.skipped += n
        on_skip = getattr(self._writer, "skipped", None)
        if on_skip is not None:
            on_skip(n)

    def set_tail(self, tail: bytes) -> None:
        """The stream's last bytes, read back from its file after skips."""
        self._tail.clear()
        self._tail.append(tail[-self.tail_cap :] if self.tail_cap else b"")
        self._tail_len = len(self._tail[0])

    def value(self) -> bytes:
        # One copy of at most `limit` bytes (a 10 MiB flood's result was
        # copied twice more through bytes() and slicing).
        if self.total <= self.limit:
            # Nothing dropped: head is full only if the stream passed head_cap,
            # and the tail holds the remainder exactly.
            return b"".join([self._head, *self._tail])
        tail = b"".join(self._tail)
        return b"".join((self._head, memoryview(tail)[max(0, len(tail) - self.tail_cap) :]))


def accepts_skips(writer: Callable[[bytes], Any] | None) -> bool:
    """Whether a writer can do without the bytes the capture drops: it has
    a `skipped(n)` attribute (told the count instead). A writer without one
    (the CLI streaming to a terminal) gets every byte: the run uses pipes."""
    return writer is None or callable(getattr(writer, "skipped", None))


async def pump(
    stream: anyio.abc.ByteReceiveStream | None,
    capture: BoundedCapture,
    mark: bytes | None = None,
    extra: int = 0,
) -> bytes | None:
    """Copy a stream into `capture` until EOF, or until `mark` and `extra`
    more bytes arrive (returned; neither is captured). None at EOF."""
    if stream is None:
        return None
    held = b""  # a possible beginning of the mark, not yet captured
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            await capture.feed(held)
            return None
        if not mark:
            await capture.feed(chunk)
            continue
        data = held + chunk
        # The stub writes the mark last, so look only near the end: a full
        # `find` over every chunk of a flood cost ~0.7 ms per 150 KB (most of
        # a warm flood's time). A mark followed by more than 64 bytes (a
        # background child still writing) is missed: the run then ends the
        # slow way, when the sandbox exits.
        at = data.find(mark, max(0, len(data) - len(mark) - extra - 64))
        if at >= 0:
            if len(data) >= at + len(mark) + extra:
                await capture.feed(data[:at])
                return data[at + len(mark) : at + len(mark) + extra]
            await capture.feed(data[:at])
            held = data[at:]
        else:
            # Hold back only a tail that could begin the mark, so live output
            # (`echo started; sleep 60`) reaches the writers at once.
            n = _mark_prefix(data, mark)
            await capture.feed(data[: len(data) - n])
            held = data[len(data) - n :]


def _mark_prefix(data: bytes, mark: bytes) -> int:
    """Length of the longest end of `data` that is a beginning of `mark`."""
    for n in range(min(len(mark) - 1, len(data)), 0, -1):
        if data.endswith(mark[:n]):
            return n
    return 0


async def feed(
    stream: anyio.abc.ByteSendStream,
    header: bytes | None,
    data: bytes | AsyncIterable[bytes] | None,
    on_header: Callable[[], None] = lambda: None,
) -> None:
    """The claim line (warm; `on_header` once it is written), then the
    caller's stdin, then EOF."""
    try:
        if header is not None:
            await stream.send(header)
            on_header()
        if isinstance(data, bytes):
            view = memoryview(data)
            for i in range(0, len(view), 65536):
                await stream.send(bytes(view[i : i + 65536]))
        elif data is not None:
            async for chunk in data:
                await stream.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError):
        pass  # the command stopped reading; not an error
    finally:
        try:
            await stream.aclose()
        except (anyio.BrokenResourceError, BrokenPipeError, OSError):
            pass
