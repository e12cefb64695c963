"""Spare bundle directories: a cold run's empty root made before it is asked for.

A cold run's bundle holds an empty root with every mountpoint (rootfs.make_root):
~15 mkdirs and symlinks, 10-70 ms of a cold run on this host's ext4 under
load, all on the run's clock (the benchmarks' raw reference writes its
bundle before its clock starts). Here the root for a run's set of
mountpoints is made ahead, in a worker thread, as `.spare-<container id>`
in the bundle base directory; a run whose mountpoints match renames it to
its own bundle (one rename) and the next spare is made after it.

A spare of a *shape* (issue 18) is more: for cold runs of the common shape
(built-in root, output files, the cgroup pre-join; any network mode)
the spare's id is the run's container id, and the host side of its `runsc
run` is started ahead too (Host.start_spare): its cgroup leaf, its output
files, for network=sandbox its namespaces, and the launcher, joined to the
leaf and waiting for a go line
(runsc.Launch.wait_for_go). A run takes it with one rename, writes its
config.json and limits, and says go: the launcher's fork/exec and its
cgroup migration (an RCU grace period, ~10 ms here) are off its clock. The
reference the benchmarks compare with still runs runsc the plain way.

A spare's name carries the owner instance like a container id, so one left
by a server that died is reaped like any other leftover (reaper.py; a
started spare's launcher exits by itself when its server's end of its stdin
closes), and a Manager removes its own when it closes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from .rootfs import make_root

log = structlog.get_logger("gvisor_mcp.sandbox")

PREFIX = ".spare-"
PER_KEY = 2
"""Spares kept per set of mountpoints and shape (concurrent cold runs each take one)."""
MAX_KEYS = 4
"""Keys (sets of mountpoints, shape) kept (a policy uses one or two); the oldest goes first."""

Key = tuple[tuple[str, ...], Hashable]
"""(mountpoints, shape); shape None: the root only."""


@dataclass
class Spare:
    path: Path
    """`.spare-<id>` while it waits; the run's bundle once taken."""
    cid: str
    started: Any = None
    """What the host started for a spare of a shape (Host.start_spare), else None."""


class Spares:
    def __init__(
        self,
        base: Path,
        system: list[tuple[str, str | None]],
        new_id: Callable[[], str],
        start: Callable[[Spare, Hashable], Awaitable[Any]] | None = None,
        stop: Callable[[Any], Awaitable[None]] | None = None,
    ) -> None:
        """`start(spare, shape)` starts a spare's host side once its root is
        made (raising OSError or SandboxError when it cannot); `stop` undoes
        it for a spare nobody took."""
        self._base = base
        self._system = system
        self._new_id = new_id
        self._start = start
        self._stop = stop
        self._ready: dict[Key, list[Spare]] = {}
        self._making: dict[Key, int] = {}
        self._pending: set[Path] = set()
        self._closed = False

    def take(self, mountpoints: tuple[str, ...], bundle: Path) -> bool:
        """Make `bundle` (absent) from a spare for `mountpoints`: True when one
        was ready (bundle/rootfs is then the root); False, and nothing done,
        when none was."""
        ready = self._ready.get((mountpoints, None))
        while ready:
            spare = ready.pop()
            try:
                os.rename(spare.path, bundle)
                return True
            except OSError as e:  # removed behind our back: make the root the slow way
                log.warning("spare_lost", path=str(spare.path), error=str(e))
        return False

    async def take_started(
        self, mountpoints: tuple[str, ...], shape: Hashable, usable: Callable[[Any], bool]
    ) -> Spare | None:
        """A started spare of `shape` for `mountpoints`, renamed to its bundle
        (`<base>/<its id>`: the run takes its id); None when none is ready.
        One that is not `usable` (its launcher already exited) is discarded."""
        ready = self._ready.get((mountpoints, shape))
        while ready:
            spare = ready.pop()
            bundle = self._base / spare.cid
            if usable(spare.started):
                try:
                    os.rename(spare.path, bundle)
                    spare.path = bundle
                    return spare
                except OSError as e:
                    log.warning("spare_lost", path=str(spare.path), error=str(e))
            await self._discard(spare)
        return None

    def wanted(self, mountpoints: tuple[str, ...], shape: Hashable = None) -> int:
        """How many spares for `mountpoints` (and `shape`) are missing (none once closed)."""
        if self._closed:
            return 0
        key = (mountpoints, shape)
        have = len(self._ready.get(key, ())) + self._making.get(key, 0)
        return max(0, PER_KEY - have)

    async def refill(self, mountpoints: tuple[str, ...], shape: Hashable = None) -> None:
        """Make the spares `mountpoints` (and `shape`) lacks, off the event loop
        (the root; a shape's host side is started in it)."""
        key = (mountpoints, shape)
        for _ in range(self.wanted(mountpoints, shape)):
            self._making[key] = self._making.get(key, 0) + 1
            cid = self._new_id()
            spare = Spare(self._base / f"{PREFIX}{cid}", cid)
            self._pending.add(spare.path)
            try:
                await anyio.to_thread.run_sync(self._make, spare.path, mountpoints)
                if shape is not None and self._start is not None and not self._closed:
                    spare.started = await self._start(spare, shape)
            except BaseException as e:  # OSError, SandboxError: the runs make their own
                await self._discard(spare)
                if not isinstance(e, Exception):
                    raise  # cancelled (the Manager's task group ended)
                log.warning("spare_failed", path=str(spare.path), error=str(e))
                return
            finally:
                self._making[key] -= 1
                self._pending.discard(spare.path)
            if self._closed:
                await self._discard(spare)
                return
            self._ready[key] = [*self._ready.pop(key, []), spare]  # most recent key last
            while len(self._ready) > MAX_KEYS:
                for old in self._ready.pop(next(iter(self._ready))):
                    await self._discard(old)

    def _make(self, path: Path, mountpoints: tuple[str, ...]) -> None:
        path.mkdir(mode=0o700)
        make_root(path / "rootfs", list(mountpoints), self._system)

    async def _discard(self, spare: Spare) -> None:
        with anyio.CancelScope(shield=True):
            if spare.started is not None and self._stop is not None:
                await self._stop(spare.started)
            await anyio.to_thread.run_sync(shutil.rmtree, spare.path, True)

    def names(self) -> set[str]:
        """Our spares' container-id part (reaper: ours, in use)."""
        paths = [*self._pending, *(s.path for ss in self._ready.values() for s in ss)]
        return {p.name[len(PREFIX) :] for p in paths}

    async def close(self) -> None:
        """Remove every spare (stopping what was started for it); none is made after."""
        self._closed = True
        spares = [s for ss in self._ready.values() for s in ss]
        self._ready.clear()
        for spare in spares:
            await self._discard(spare)
