"""Append-only audit log: one JSON line per call, in the state directory.

Bounded: when `audit.jsonl` would pass `max_bytes`, it is renamed
`audit.jsonl.1` (`.1` to `.2`, ... up to `keep` old files; the oldest is
deleted), so the log never holds more than `(keep + 1) * max_bytes`.
Command text is cut to 4 KiB plus its size and SHA-256 (text.clip_command).

Several servers may share one state directory: lines are appended with
O_APPEND (each lands whole), rotation happens under an flock, and before
each write a server checks that its descriptor is still `audit.jsonl`,
reopening it when someone rotated the file. That check also makes external
rotation work without a signal: logrotate's default (rename, then the
server recreates the file on its next line) needs no SIGHUP, and SIGHUP
does not reopen the log (it only reloads the policy). `copytruncate` is
not needed and not recommended (lines written during the copy are lost).

A full disk never raises out of `write()`: the line is kept in a small
backlog and `writable()` tells the server to refuse new calls until the
backlog could be written (fail closed: no command runs unaudited).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import structlog

from .errors import StateUnavailable
from .text import clip_command, command_sha256

log = structlog.get_logger("gvisor_mcp.audit")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 4
BACKLOG_LINES = 1000
"""Lines kept in memory while the disk is full; past it new lines are
dropped and counted (an `audit_lines_lost` line says how many). Calls are
refused while lines are pending, so only lines of runs already going get here."""


class AuditUnavailable(StateUnavailable):
    """The audit log cannot be written (e.g. the state disk is full)."""


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        if max_bytes < 4096 or keep < 0:
            raise ValueError("audit log: max_bytes must be at least 4096 and keep at least 0")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = path.with_name(path.name + ".lock")
        self._fd = -1
        self._backlog: deque[bytes] = deque()
        self._partial = b""
        """The unwritten rest of the backlog's first line after a short write."""
        self._dropped = 0
        self._last_error: str | None = None
        self._throttle: dict[str, tuple[float, int]] = {}
        self._open()

    # --- writing ----------------------------------------------------------------

    def write(self, **entry: Any) -> bool:
        """Append one line; False (logged, kept in the backlog) when it could not be written."""
        entry.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        command = entry.get("command")
        if isinstance(command, str):  # sizes of the whole command, unless given (already cut)
            entry.setdefault("command_bytes", len(command.encode("utf-8", "surrogatepass")))
            entry.setdefault("command_sha256", command_sha256(command))
            entry["command"] = clip_command(command)
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")
        if len(self._backlog) >= BACKLOG_LINES:
            self._dropped += 1  # the backlog keeps the oldest lines; this one is counted
        else:
            self._backlog.append(line)
        return self._flush()

    def write_throttled(self, key: str, interval: float = 1.0, **entry: Any) -> bool:
        """Like write(), but at most one line per `key` per `interval` seconds;
        the next line written says how many were `suppressed` since."""
        now = time.monotonic()
        last, suppressed = self._throttle.get(key, (-interval, 0))
        if now - last < interval:
            self._throttle[key] = (last, suppressed + 1)
            return True
        if len(self._throttle) > 10_000:  # keys are tenants: bounded in practice; never unbounded
            self._throttle.clear()
        self._throttle[key] = (now, 0)
        if suppressed:
            entry["suppressed"] = suppressed
        return self.write(**entry)

    def writable(self) -> None:
        """Raise AuditUnavailable unless every line so far is on disk (retrying the backlog)."""
        if self._backlog and not self._flush():
            raise AuditUnavailable(self._last_error or "the audit log cannot be written")

    def _flush(self) -> bool:
        try:
            if self._dropped and not self._partial:
                note = {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "decision": "audit_lines_lost",
                    "lost": self._dropped,
                }
                self._append(json.dumps(note, separators=(",", ":")).encode() + b"\n")
                self._dropped = 0
            while self._backlog:
                self._append(self._backlog[0])
                self._backlog.popleft()  # whole: _append raised otherwise
        except OSError as e:
            if self._last_error is None:
                log.error("audit_write_failed", path=str(self.path), error=str(e), pending=len(self._backlog))
            self._last_error = f"{e.strerror or e} (audit log)"
            return False
        if self._last_error is not None:
            log.info("audit_write_recovered", path=str(self.path))
            self._last_error = None
        return True

    def _append(self, line: bytes) -> None:
        """Write one whole line, or raise OSError having written none of it.

        Checking the free space first keeps a nearly full disk from tearing a
        line; should a write still come up short, the rest of the line stays
        at the head of the backlog and goes out first on the next try."""
        if self._partial:
            line = self._partial
        else:
            self._reopen_if_rotated()
            if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
                self._rotate()
            fs = os.fstatvfs(self._fd)
            if fs.f_bavail * fs.f_frsize < len(line) + fs.f_frsize:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(self._fd, line)
        self._partial = line[n:]
        if self._partial:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # --- files ------------------------------------------------------------------

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def _reopen_if_rotated(self) -> None:
        if self._fd < 0:
            raise OSError(9, "the audit log is closed")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return
        own = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
            self._open()

    def _rotate(self) -> None:
        lock = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._reopen_if_rotated()  # another server may have rotated while we waited
            if os.fstat(self._fd).st_size < self.max_bytes // 2:
                return
            old = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.keep + 1)]
            if old:
                old[-1].unlink(missing_ok=True)
                for i in range(len(old) - 1, 0, -1):
                    if old[i - 1].exists():
                        old[i - 1].replace(old[i])
                self.path.replace(old[0])
            else:
                self.path.unlink(missing_ok=True)
            self._open()
            log.info("audit_rotated", path=str(self.path), keep=self.keep)
        finally:
            os.close(lock)

    def close(self) -> None:
        if self._backlog:
            self._flush()
        if self._backlog:
            log.error("audit_lines_lost_at_stop", lines=len(self._backlog))
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
