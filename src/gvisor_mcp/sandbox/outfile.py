"""A cold run's stdout/stderr as regular files in its bundle (issue 18).

With a pipe, a flooding command and our reader wake each other for every
pipe-full, and every byte is copied out of the pipe into Python, most of it
only to be dropped by the bounded capture: a 100 MB flood ran at 0.85x of raw
runsc writing a regular file. Here the sentry writes straight to a file
opened O_APPEND, as raw runsc to a file does, and we look at it every
POLL_INTERVAL (and once more after the `runsc run` client has exited):

- every byte up to the capture's limit is read, in order, so the head, the
  writers (live paging, progress) and small outputs are exactly as with a
  pipe;
- past the limit, a poll that finds more than READ_ALL new bytes reads only
  the last TAIL_READ of them (progress keeps its last line) and counts the
  rest as skipped (BoundedCapture.skip); the tail is then read back from the
  file at the end;
- what can no longer be part of the result is punched out of the file
  (FALLOC_FL_PUNCH_HOLE), so the file holds at most the tail's share of the
  limit plus one poll's worth of new bytes, however long the flood.

O_APPEND keeps what commands see as with a pipe (measured with runsc here):
`echo x > /dev/stdout` and `tee /dev/stdout` append instead of truncating or
writing over the start (Linux's pwrite appends on an O_APPEND description,
whatever offset the sentry passes). A pooled sandbox's stdout becomes O_APPEND only
once the sandbox has booted (append_after_boot, set_append): the sentry
fstats an O_APPEND host file before every write, and does not for one that
was not O_APPEND when it imported it. The cost, documented in design-notes:
the file's pages are charged to the run's memory cgroup (like the pipe's
buffer before, but up to the tail's share of the cap plus a poll's worth),
and nothing slows a flooding writer down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
from pathlib import Path

import anyio

from .output import BoundedCapture

POLL_INTERVAL = 0.05
"""Seconds between looks at the file while the command runs: live output
and progress lag by at most this; the result itself does not (the last look
is when the runsc client exits)."""
READ_ALL = 1 << 20
"""Past the limit, a poll finding at most this many new bytes reads them all."""
TAIL_READ = 64 * 1024
"""Past the limit, in a flood: the bytes read per poll (for the last line)."""
PUNCH_MIN = 4 << 20
"""Punch only ranges at least this large: each punch briefly holds the
file against the sandbox's appends, and freed pages are reused warm by the
writer (100 MB appended with 4 MiB punches took 159 ms here, without
punching 555 ms on ext4, from dirty-page throttling)."""
CHUNK = 1 << 20

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_PAGE = 4096
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the file's blocks in [offset, offset + length); its size stays."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def can_punch(directory: Path) -> bool:
    """Whether files under `directory` support punching holes (tmpfs, ext4,
    xfs, btrfs do); without it an output file would grow with the flood."""
    path = directory / ".punch-probe"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, b"\0" * _PAGE)
        punch_hole(fd, 0, _PAGE)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


class OutputFile:
    """One stream's file: the sandbox's end (`writer_fd`, O_APPEND, given to
    the `runsc run` client) and ours (read, punch)."""

    def __init__(self, path: Path, *, append_after_boot: bool = False) -> None:
        """`append_after_boot` (a pooled sandbox's stdout): the file is not
        O_APPEND when the sandbox imports it, so gVisor's sentry does not
        fstat the file before each write (it does for an O_APPEND host file,
        to track the end itself: ~25% of a 100 MB flood's wall time here);
        set_append() makes the description O_APPEND once the sandbox has
        booted, before any command runs, and Linux then appends every write
        whatever offset the sentry passes."""
        self.path = path
        self._append_later = append_after_boot
        append = 0 if append_after_boot else os.O_APPEND
        self.writer_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | append | os.O_CLOEXEC, 0o600)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self.writer_fd)
            raise
        self.pos = 0
        """Bytes of the file accounted for (read or skipped)."""
        self._punched = 0
        self._punch_ok = True

    def handed_over(self) -> None:
        """The `runsc run` client has its own copy of the sandbox's end: ours
        is closed, unless set_append() still needs it."""
        if not self._append_later:
            self.close_writer()

    def set_append(self) -> None:
        """Make the sandbox's end O_APPEND (a description shared with the
        sandbox): called once the sandbox has booted, i.e. after its sentry
        read the flags, and before any command wrote. Then close our copy."""
        if self.writer_fd < 0:
            raise anyio.ClosedResourceError
        flags = fcntl.fcntl(self.writer_fd, fcntl.F_GETFL)
        fcntl.fcntl(self.writer_fd, fcntl.F_SETFL, flags | os.O_APPEND)
        self._append_later = False
        self.close_writer()

    def close_writer(self) -> None:
        """Our copy of the sandbox's end."""
        if self.writer_fd >= 0:
            os.close(self.writer_fd)
            self.writer_fd = -1

    async def aclose(self) -> None:
        self.close_writer()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    async def pump(
        self,
        capture: BoundedCapture,
        ended: anyio.Event,
        mark: bytes | None = None,
        exited: anyio.Event | None = None,
    ) -> bool:
        """Follow the file into `capture` until `ended` (the client exited),
        then take what is left and, if bytes were skipped, the exact tail.

        With `mark` (a pooled stub's stdout, stub.py): `ended` is the stub's
        report on stderr, written after the mark on stdout; the file then
        ends with the mark, which is never captured (a look holds back any
        end of the file that could begin it): True. When the mark is not
        within 64 bytes of the end then (a background child wrote after
        it), the file is followed as any other until `exited`: False."""
        found = False
        while True:
            last = ended.is_set()  # before the look: a last look sees every byte
            if last and mark:
                at = self._find_mark(mark)
                if at is not None:
                    await self._look(capture, at)
                    found = True
                    break
                mark = None  # missed: follow on to the client's exit
                if exited is not None:
                    ended = exited
                continue
            await self._look(capture, self._held_back(mark) if mark else None)
            if last:
                break
            with anyio.move_on_after(POLL_INTERVAL):
                await ended.wait()
        if capture.skipped:
            capture.set_tail(self._pread(max(capture.head_len, self.pos - capture.tail_cap), self.pos))
        return found

    def _held_back(self, mark: bytes) -> int:
        """Where a look must stop: before any end of the file that is the
        mark or could begin it (live output still reaches the writers)."""
        size = self._size()
        start = max(self.pos, size - len(mark))
        end = self._pread(start, size)
        if end.endswith(mark):
            return size - len(mark)
        for n in range(min(len(mark) - 1, len(end)), 0, -1):
            if end.endswith(mark[:n]):
                return size - n
        return size

    def _find_mark(self, mark: bytes) -> int | None:
        """The mark's offset, if it lies within 64 bytes of the file's end
        (as output.pump looks for it in a pipe)."""
        size = self._size()
        start = max(self.pos, size - len(mark) - 64)
        at = self._pread(start, size).find(mark)
        return None if at < 0 else start + at

    def _size(self) -> int:
        if self._fd < 0:
            raise anyio.ClosedResourceError
        return os.fstat(self._fd).st_size

    async def _look(self, capture: BoundedCapture, upto: int | None = None) -> None:
        size = self._size() if upto is None else upto
        # Every byte of the head (and, for a writer, up to the limit: the
        # live part file holds the first `limit` bytes) is read, in order.
        exact = capture.limit if capture.has_writer else capture.head_cap
        while self.pos < size and capture.total < exact:
            end = min(size, self.pos + CHUNK, self.pos + exact - capture.total)
            await capture.feed(self._pread(self.pos, end))
            self.pos = end
        new = size - self.pos
        if new > READ_ALL and capture.can_skip:
            capture.skip(new - TAIL_READ)
            self.pos = size - TAIL_READ
        while self.pos < size:
            end = min(size, self.pos + CHUNK)
            await capture.feed(self._pread(self.pos, end))
            self.pos = end
        await self._punch(min(self.pos, size - capture.tail_cap))

    async def _punch(self, upto: int) -> None:
        """Drop the file's bytes before `upto` (page-aligned): what was read
        is in the capture, and what lies before the last tail_cap bytes can
        no longer be part of the tail. In a worker thread: a punch waits for
        the sandbox's writes to the same file (9 ms per call measured under
        load), which must not stall the event loop."""
        upto -= upto % _PAGE
        if not self._punch_ok or upto - self._punched < PUNCH_MIN:
            return
        try:
            await anyio.to_thread.run_sync(punch_hole, self._fd, self._punched, upto - self._punched)
        except OSError:
            self._punch_ok = False  # checked with can_punch before use; keep going
            return
        self._punched = upto

    def _pread(self, start: int, end: int) -> bytes:
        parts = []
        while start < end:
            data = os.pread(self._fd, end - start, start)
            if not data:
                break
            parts.append(data)
            start += len(data)
        return b"".join(parts)
