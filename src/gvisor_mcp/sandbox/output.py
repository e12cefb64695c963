"""Bounded capture of one output stream: head and tail kept, every byte counted.

The host process must not grow with what a command prints (a `yes` or a
/dev/urandom flood), so the middle is dropped as it arrives; chunks still go
to the caller's writer as they come, for streaming and spill files.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from typing import Any


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
        self._tail_cap = limit - self._head_cap
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
        if self._tail_cap == 0:
            return
        if len(chunk) >= self._tail_cap:
            self._tail.clear()
            self._tail.append(chunk[-self._tail_cap :])
            self._tail_len = self._tail_cap
            return
        self._tail.append(chunk)
        self._tail_len += len(chunk)
        # Drop whole chunks while the rest still covers the tail.
        while self._tail_len - len(self._tail[0]) >= self._tail_cap:
            self._tail_len -= len(self._tail.popleft())

    def value(self) -> bytes:
        tail = b"".join(self._tail)
        if self.total <= self.limit:
            # Nothing dropped: head is full only if the stream passed head_cap,
            # and the tail holds the remainder exactly.
            return bytes(self._head) + tail
        return bytes(self._head) + tail[-self._tail_cap :]
