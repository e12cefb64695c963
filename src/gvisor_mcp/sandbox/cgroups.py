"""Per-run cgroups that we own: limits written by us, counters read by us.

runsc applies the spec's limits only to a cgroup it creates, and then deletes
that cgroup (and its counters) when `run` returns. So the leaf is made here,
limits written here, runsc joins it, and after `run` returns we read peak
memory and the OOM counter, then remove it. Paths are fresh for every run: a
stale cgroup at a reused path would keep its old limits.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
from pydantic import BaseModel, ConfigDict

from .options import ResourceSpec
from .spec import CPU_PERIOD_US, host_pids_limit, to_cgroup_v2_entries

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_OWNED = ("memory", "cpu", "pids")
"""v1 controllers whose leaf we create (not cpuset: it needs cpus/mems copied)."""
V1_FREEZER = "freezer"
"""The v1 hierarchy a freezable leaf (a pooled sandbox's) is also made and joined in."""


class CgroupStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    peak_memory_bytes: int = 0
    oom_kills: int = 0


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _read_keyed(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def limits_of(res: ResourceSpec) -> tuple[float, ...]:
    """What Cgroup.apply writes from: two specs equal here need no rewrite."""
    return (res.memory_mb, res.cpus, res.max_pids)


def detect_version(root: Path = CGROUP_ROOT) -> int | None:
    """2 for a unified hierarchy, 1 when a v1 memory controller is mounted."""
    if (root / "cgroup.controllers").exists():
        return 2
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    return None


def freezer_available(version: int, root: Path = CGROUP_ROOT) -> bool:
    """Whether leaves can be frozen: v2 has `cgroup.freeze` in every
    non-root cgroup (kernel >= 5.2); v1 needs the freezer hierarchy mounted."""
    if version == 2:
        return True
    return (root / V1_FREEZER / "cgroup.procs").exists()


class Cgroup:
    """One run's cgroup at `rel` (e.g. "/gvisor-mcp/gm-...") under `root`.

    `freezer`: v1 also makes (and the launcher joins) a leaf in the freezer
    hierarchy, so `freeze()` can stop every process of the sandbox (a pooled
    one, idle: pool.py). v2 freezes the one leaf, whatever this says."""

    def __init__(self, rel: str, version: int, root: Path = CGROUP_ROOT, *, freezer: bool = False) -> None:
        self.rel = rel
        self.version = version
        self.root = root
        self.freezer = freezer

    @property
    def _v1_owned(self) -> tuple[str, ...]:
        return (*V1_OWNED, V1_FREEZER) if self.freezer else V1_OWNED

    def _dir(self, controller: str | None = None) -> Path:
        base = self.root if self.version == 2 else self.root / (controller or "")
        return base / self.rel.lstrip("/")

    def create(self, res: ResourceSpec) -> None:
        """Create the leaf and write the limits (zero fields stay unlimited)."""
        made = self._mkdirs_v2() if self.version == 2 else self._mkdirs_v1()
        try:
            self.apply(res)
        except BaseException:
            for d in made:
                _rmdir(d)
            raise

    def apply(self, res: ResourceSpec) -> None:
        """(Re)write the limits: at creation, and when a warm sandbox is claimed.

        A zero field means unlimited, so it is written as such (a pooled
        sandbox may carry a previous limit).
        """
        if self.version == 2:
            entries = {e.file: e.value for e in to_cgroup_v2_entries(res)}
            entries.setdefault("memory.max", "max")
            entries.setdefault("cpu.max", f"max {CPU_PERIOD_US}")
            leaf = self._dir()
            for name, value in entries.items():
                try:
                    _write(leaf / name, value)
                except OSError:
                    if name != "memory.swap.max":  # absent without swap accounting
                        raise
            return
        mem = self._dir("memory")
        limit = str(res.memory_mb * 1024 * 1024) if res.memory_mb else "-1"
        sw = mem / "memory.memsw.limit_in_bytes"
        # v1 wants memsw >= mem at every step: a limit going up moves memsw
        # first, one going down moves it last (a leaf made with other limits:
        # a claimed pooled sandbox, a spare launcher's leaf).
        writes = [(mem / "memory.limit_in_bytes", limit)]
        if sw.exists():
            current = _read_int(mem / "memory.limit_in_bytes")
            raising = not res.memory_mb or res.memory_mb * 1024 * 1024 > current
            writes = [(sw, limit), writes[0]] if raising else [writes[0], (sw, limit)]
        for path, value in writes:
            try:
                _write(path, value)
            except OSError:
                if path == sw:
                    continue  # swap accounting off: nothing to cap
                raise
        cpu = self._dir("cpu")
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        quota = max(1000, int(res.cpus * CPU_PERIOD_US + 0.999)) if res.cpus else -1
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        _write(self._dir("pids") / "pids.max", str(host_pids_limit(res.max_pids)))

    def procs_files(self) -> tuple[str, ...]:
        """The leaf's cgroup.procs files: writing 0 to each moves the writer
        into the whole leaf (v1: one per owned controller; v2: the one)."""
        if self.version == 2:
            return (str(self._dir() / "cgroup.procs"),)
        return tuple(str(self._dir(c) / "cgroup.procs") for c in self._v1_owned)

    def reset_peak(self) -> None:
        """Start peak-memory accounting afresh (a claimed warm sandbox's boot
        is not the command's usage). Best effort: v2 needs kernel >= 6.12."""
        path = self._dir() / "memory.peak" if self.version == 2 else self._dir("memory") / "memory.max_usage_in_bytes"
        try:
            _write(path, "0")
        except OSError:
            pass

    def freeze(self) -> None:
        """Ask the kernel to freeze every process in the leaf (raises OSError).

        Returns at once: the tasks stop as they next leave the kernel
        (v1 reads FREEZING, then FROZEN; v2's cgroup.events says frozen 1).
        A frozen task runs nothing, not even a pending SIGKILL, until
        thawed: whatever must talk to the sandbox or kill it thaws first."""
        if self.version == 2:
            _write(self._dir() / "cgroup.freeze", "1")
        else:
            _write(self._dir(V1_FREEZER) / "freezer.state", "FROZEN")

    def thaw(self) -> None:
        """Let the leaf's processes run again (raises OSError, e.g.
        FileNotFoundError without a freezer leaf). Harmless when not frozen."""
        _write(*self.thaw_write())

    def thaw_write(self) -> tuple[Path, str]:
        """What thaw() writes, and where (for a `rel` with a glob in it: the
        files a ThawGuard writes, thawguard.py)."""
        if self.version == 2:
            return self._dir() / "cgroup.freeze", "0"
        return self._dir(V1_FREEZER) / "freezer.state", "THAWED"

    def freezer_state(self) -> str | None:
        """The freezer's state: "THAWED", "FREEZING" (asked, not all stopped yet) or "FROZEN";
        None without a freezer leaf."""
        try:
            if self.version == 2:
                d = self._dir()
                if _read_keyed(d / "cgroup.events", "frozen"):
                    return "FROZEN"
                return "FREEZING" if (d / "cgroup.freeze").read_text().strip() == "1" else "THAWED"
            return (self._dir(V1_FREEZER) / "freezer.state").read_text().strip()
        except OSError:
            return None

    def _mkdirs_v1(self) -> list[Path]:
        made: list[Path] = []
        try:
            for c in self._v1_owned:
                d = self._dir(c)
                d.parent.mkdir(parents=True, exist_ok=True)
                d.mkdir()
                made.append(d)
        except BaseException:
            for d in made:
                _rmdir(d)
            raise
        return made

    def _mkdirs_v2(self) -> list[Path]:
        leaf = self._dir()
        parent = leaf.parent
        if not parent.exists():
            parent.mkdir(parents=True)
        # Enable the controllers for our leaves, all the way down from the root.
        node = self.root
        for part in parent.relative_to(self.root).parts:
            try:
                _write(node / "cgroup.subtree_control", "+memory +cpu +pids")
            except OSError:
                pass  # already enabled or delegated by the service manager
            node = node / part
        try:
            _write(parent / "cgroup.subtree_control", "+memory +cpu +pids")
        except OSError:
            pass
        leaf.mkdir()
        return [leaf]

    def stats(self) -> CgroupStats:
        """Peak memory and OOM kills so far; read before remove()."""
        if self.version == 2:
            d = self._dir()
            return CgroupStats(
                peak_memory_bytes=_read_int(d / "memory.peak"),
                oom_kills=_read_keyed(d / "memory.events", "oom_kill"),
            )
        d = self._dir("memory")
        return CgroupStats(
            peak_memory_bytes=_read_int(d / "memory.max_usage_in_bytes"),
            oom_kills=_read_keyed(d / "memory.oom_control", "oom_kill"),
        )

    def existing_dirs(self) -> list[Path]:
        """Every directory of this cgroup, in every hierarchy (runsc makes the
        v1 controllers we did not, and leaves them when its client is killed)."""
        if self.version == 2:
            d = self._dir()
            return [d] if d.is_dir() else []
        out = []
        for ctl in sorted(self.root.iterdir()):
            d = ctl / self.rel.lstrip("/")
            if d.is_dir() and not ctl.is_symlink():
                out.append(d)
        return out

    async def remove(self, attempts: int = 50) -> list[Path]:
        """rmdir everywhere, retrying while the last tasks exit; returns what remains."""
        left = await anyio.to_thread.run_sync(self.existing_dirs)
        for _ in range(attempts):
            # In a worker thread: an rmdir here waits for the kernel (a v1
            # memory cgroup's offlining; 5-70 ms per run on this loaded host),
            # which must not stall the event loop and every other call with it.
            left = await anyio.to_thread.run_sync(_rmdir_pass, left)
            if not left:
                return []
            await anyio.sleep(0.02)
        return left


def _rmdir_pass(dirs: list[Path]) -> list[Path]:
    """One attempt at removing each cgroup directory (children first); what stays."""
    still = []
    for d in dirs:
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
            _rmdir(sub)
        if not _rmdir(d):
            still.append(d)
    return still


def _rmdir(d: Path) -> bool:
    try:
        os.rmdir(d)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise


def list_leaves(parent_rel: str, version: int, root: Path = CGROUP_ROOT) -> set[str]:
    """Names of run cgroups under `parent_rel`, in any hierarchy."""
    names: set[str] = set()
    bases = [root] if version == 2 else [c for c in root.iterdir() if not c.is_symlink()]
    for base in bases:
        d = base / parent_rel.lstrip("/")
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.is_dir())
    return names
