"""Watching an image tool while it runs: a full disk, and our own death.

Builds run synchronously (the CLI), blocked reading the tool's output, so
what must happen meanwhile happens in a watcher thread or in the kernel.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path


def term_with_parent() -> None:
    """Runs in the child before exec: SIGTERM mmdebstrap if we die (even by SIGKILL).

    mmdebstrap runs in its own session (so _stop can signal its whole group),
    which also means a killed `gvisor-mcp image build` would leave it, and the
    apt it drives, running forever. PR_SET_PDEATHSIG (1) hands it SIGTERM
    instead, on which it cleans up after itself.
    """
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


class DiskWatch:
    """Stops mmdebstrap when the disk under its work directory is full.

    Measured here: on a full disk apt-get update (inside mmdebstrap) does not
    fail, it deadlocks (its http, store and gpgv methods all waiting in poll),
    so the build would hang until its timeout. It deadlocked with 1.5 MiB
    still free (a write of a larger decompressed index failed), so "full"
    means below FLOOR, which no real build could finish in anyway (the
    smallest variant is ~100 MiB). Free space is checked every second; below
    FLOOR twice in a row, the process group is stopped and the build reports a
    full disk. A thread, because the build is synchronous code blocked reading
    mmdebstrap's tar stream.
    """

    FLOOR = 8 * 1024 * 1024
    PERIOD = 1.0

    def __init__(
        self, path: Path, proc: subprocess.Popen[bytes], stop: Callable[[subprocess.Popen[bytes]], None]
    ) -> None:
        self.full = False
        self._path = path
        self._proc = proc
        self._stop = stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-disk-watch", daemon=True)
        self._thread.start()

    def _free(self) -> int:
        st = os.statvfs(self._path)
        return st.f_bavail * st.f_frsize

    def _run(self) -> None:
        low = 0
        while not self._done.wait(self.PERIOD):
            try:
                low = low + 1 if self._free() < self.FLOOR else 0
            except OSError:
                return
            if low >= 2:
                self.full = True
                self._stop(self._proc)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
