"""Spare bundle directories: a cold run's empty root made before it is asked for.

A cold run's bundle holds an empty root with every mountpoint (rootfs.make_root):
~15 mkdirs and symlinks, 10-70 ms of a cold run on this host's ext4 under
load, all on the run's clock (the benchmarks' raw reference writes its
bundle before its clock starts). Here the root for a run's set of
mountpoints is made ahead, in a worker thread, as `.spare-<container id>`
in the bundle base directory; a run whose mountpoints match renames it to
its own bundle (one rename) and the next spare is made after it.

A spare's name carries the owner instance like a container id, so one left
by a server that died is reaped like any other leftover (reaper.py), and a
Manager removes its own when it closes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import structlog

from .rootfs import make_root

log = structlog.get_logger("gvisor_mcp.sandbox")

PREFIX = ".spare-"
PER_KEY = 2
"""Spares kept per set of mountpoints (concurrent cold runs each take one)."""
MAX_KEYS = 4
"""Sets of mountpoints kept (a policy uses one or two); the oldest goes first."""


class Spares:
    def __init__(self, base: Path, system: list[tuple[str, str | None]], new_id) -> None:  # type: ignore[no-untyped-def]
        self._base = base
        self._system = system
        self._new_id = new_id
        self._ready: dict[tuple[str, ...], list[Path]] = {}
        self._making: dict[tuple[str, ...], int] = {}
        self._pending: set[Path] = set()
        self._closed = False

    def take(self, mountpoints: tuple[str, ...], bundle: Path) -> bool:
        """Make `bundle` (absent) from a spare for `mountpoints`: True when one
        was ready (bundle/rootfs is then the root); False, and nothing done,
        when none was."""
        ready = self._ready.get(mountpoints)
        while ready:
            spare = ready.pop()
            try:
                os.rename(spare, bundle)
                return True
            except OSError as e:  # removed behind our back: make the root the slow way
                log.warning("spare_lost", path=str(spare), error=str(e))
        return False

    def wanted(self, mountpoints: tuple[str, ...]) -> int:
        """How many spares for `mountpoints` are missing (none once closed)."""
        if self._closed:
            return 0
        have = len(self._ready.get(mountpoints, ())) + self._making.get(mountpoints, 0)
        return max(0, PER_KEY - have)

    async def refill(self, mountpoints: tuple[str, ...]) -> None:
        """Make the spares `mountpoints` lacks, off the event loop."""
        for _ in range(self.wanted(mountpoints)):
            self._making[mountpoints] = self._making.get(mountpoints, 0) + 1
            path = self._base / f"{PREFIX}{self._new_id()}"
            self._pending.add(path)
            try:
                await anyio.to_thread.run_sync(self._make, path, mountpoints)
            except OSError as e:
                log.warning("spare_failed", path=str(path), error=str(e))
                shutil.rmtree(path, ignore_errors=True)
                return
            finally:
                self._making[mountpoints] -= 1
                self._pending.discard(path)
            if self._closed:
                shutil.rmtree(path, ignore_errors=True)
                return
            self._ready[mountpoints] = [*self._ready.pop(mountpoints, []), path]  # most recent key last
            while len(self._ready) > MAX_KEYS:
                for p in self._ready.pop(next(iter(self._ready))):
                    shutil.rmtree(p, ignore_errors=True)

    def _make(self, path: Path, mountpoints: tuple[str, ...]) -> None:
        path.mkdir(mode=0o700)
        make_root(path / "rootfs", list(mountpoints), self._system)

    def names(self) -> set[str]:
        """Our spares' container-id part (reaper: ours, in use)."""
        paths = [*self._pending, *(p for ps in self._ready.values() for p in ps)]
        return {p.name[len(PREFIX) :] for p in paths}

    def close(self) -> None:
        """Remove every spare; none is made after."""
        self._closed = True
        for ps in self._ready.values():
            for p in ps:
                shutil.rmtree(p, ignore_errors=True)
        self._ready.clear()
