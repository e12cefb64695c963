"""What every container of one Manager shares on the host, acquired for the
Manager's `async with` and released at its end.

runsc and its state root, the bundle directory, the generated /etc and host
system entries every built-in root binds, the cgroup version, the owner lock
(container ids embed its instance: see ownership.py) and the Manager's task
group, which background work (a sandbox's teardown after an early answer,
closing inotify fds off the event loop) runs in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from .cgroups import Cgroup, detect_version
from .config import ManagerConfig
from .errors import SandboxError
from .network import NetworkHandle, NetworkProvider
from .options import NetworkMode, ResourceSpec
from .outfile import OutputFile, can_punch
from .ownership import OwnerLock, ids_of, new_container_id
from .rootfs import host_system_entries, write_etc
from .runsc import Launch, RunProcess, Runsc, missing_launcher_tools
from .spares import Spare, Spares
from .thawguard import ThawGuard

JOIN_WAIT = 5.0
"""Seconds a started spare's launcher may take to join its cgroup leaf."""


@dataclass
class Launched:
    """A started spare's host side (Host.start_spare): its cgroup leaf (the
    Manager's default limits until a run applies its own) and the `runsc
    run` launcher in it, waiting for its go line, writing to the spare's
    output files."""

    cgroup: Cgroup
    process: RunProcess
    limits: ResourceSpec
    """What the leaf's limits were written from (a run with others rewrites them)."""
    config_fd: int
    """The bundle's config.json, created empty: the run writes its spec
    into it (creating a file took ~2 ms on this host's ext4 /run)."""
    net: NetworkHandle | None = None
    """network=sandbox: the namespace prepared for it (not yet bound to a
    run: the run that takes the spare binds it, as a pooled claim does)."""

    @property
    def waiting(self) -> bool:
        return self.process.returncode is None

    def write_config(self, data: bytes) -> None:
        """The run's spec, into the config.json made ahead; then closed."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.config_fd, view) :]
        finally:
            self.close_config()

    def close_config(self) -> None:
        fd, self.config_fd = self.config_fd, -1
        if fd >= 0:
            os.close(fd)


class Host:
    tg: anyio.abc.TaskGroup
    """The Manager's task group: set by the Manager once it is entered."""

    def __init__(self, config: ManagerConfig, network: NetworkProvider | None = None) -> None:
        """Check the host and claim our directories; raises RunscError or
        SandboxError when this host cannot run sandboxes. `network` prepares
        the namespaces of network=sandbox containers."""
        self.config = config
        self.network = network
        self.runsc = Runsc(config.runsc_path, config.runsc_root, config.platform)
        version = detect_version()
        if version is None:
            raise SandboxError(
                "no cgroup memory controller found under /sys/fs/cgroup: limits cannot be enforced, refusing to run"
            )
        self.cgroup_version = version
        missing = missing_launcher_tools() if config.cgroup_prejoin and config.report_memory_limit else []
        if missing:
            raise SandboxError(
                f"report_memory_limit needs {' and '.join(missing)} on PATH (packages util-linux, "
                "mount; scripts/setup.sh installs them), or set report_memory_limit=False"
            )
        self.base = Path(config.bundle_base_dir)
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(config.runsc_root).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.etc = write_etc(self.base / ".image" / "etc")
        self.system = host_system_entries()
        self.output_files = config.output_files and can_punch(self.base)
        """Cold runs' output goes through files (outfile.py); not where the
        bundle directory's filesystem cannot punch holes."""
        self.owner = OwnerLock(self.base / ".owners")
        self.spares = Spares(self.base, self.system, self.new_container_id, self.start_spare, self.stop_spare)
        """Cold runs' empty roots, and for the common shape their launchers, made ahead (spares.py)."""
        every_leaf = Cgroup(f"/{config.cgroup_parent}/{ids_of(self.instance)}", version, freezer=True)
        self.thaw_guard = ThawGuard(*every_leaf.thaw_write())
        """Thaws our frozen pooled sandboxes if this process dies (thawguard.py); started by the pool."""

    @property
    def instance(self) -> str:
        return self.owner.instance

    def new_container_id(self) -> str:
        return new_container_id(self.owner.instance)

    def cgroup(self, container_id: str) -> Cgroup:
        return Cgroup(f"/{self.config.cgroup_parent}/{container_id}", self.cgroup_version)

    async def start_spare(self, spare: Spare, shape: Hashable) -> Launched:
        """The host side of a cold run of `shape` (its network mode), made
        ahead: for network=sandbox its namespace (from the network
        provider), then cgroup leaf, output files and the launcher, which has
        joined the leaf when this returns (SandboxError when it could not)."""
        network = NetworkMode(shape)
        net: NetworkHandle | None = None
        if network is NetworkMode.SANDBOX:
            if self.network is None:
                raise SandboxError("network=sandbox needs a network provider, and this Manager has none")
            net = await self.network.open(spare.cid)
        cg = self.cgroup(spare.cid)
        limits = self.config.default_resources
        process: RunProcess | None = None
        config_fd = -1
        try:
            cg.create(limits)
            config_fd = os.open(spare.path / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            stdout = OutputFile(spare.path / "stdout")
            try:
                stderr = OutputFile(spare.path / "stderr")
            except BaseException:
                await stdout.aclose()
                raise
            bundle = self.base / spare.cid
            process = await self.runsc.open_run(
                spare.cid,
                str(bundle),
                network,
                str(bundle / "runsc.log"),
                stdin=True,
                # network=sandbox: run_argv adds the /proc/sys/net cover, so
                # this launcher has its private mount namespace made too.
                launch=Launch(join_cgroups=cg.procs_files(), wait_for_go=True),
                outputs=(stdout, stderr),
                cwd=str(spare.path),
            )
            launched = Launched(cg, process, limits, config_fd, net)
            await self._joined(launched)
            return launched
        except BaseException:
            with anyio.CancelScope(shield=True):
                if process is not None:
                    await self.stop_spare(Launched(cg, process, limits, config_fd, net))
                else:
                    if config_fd >= 0:
                        os.close(config_fd)
                    await cg.remove()
                    if net is not None:
                        await net.aclose()
            raise

    async def _joined(self, launched: Launched) -> None:
        """Wait until the launcher is in its leaf: a run that takes it then
        waits for no cgroup migration, and a launcher that failed to join is
        never offered."""
        procs = Path(launched.cgroup.procs_files()[-1])
        pid = str(launched.process.pid)
        deadline = time.monotonic() + JOIN_WAIT
        while launched.waiting and time.monotonic() < deadline:
            try:
                if pid in procs.read_text().split():
                    return
            except OSError:
                break
            await anyio.sleep(0.005)
        raise SandboxError(f"a spare's launcher did not join its cgroup ({procs})")

    async def stop_spare(self, launched: Launched) -> None:
        """A started spare nobody took: EOF on the launcher's stdin ends it
        without running runsc; then its files and leaf go."""
        proc = launched.process
        with anyio.CancelScope(shield=True):
            if proc.stdin is not None:
                try:
                    await proc.stdin.aclose()
                except (anyio.BrokenResourceError, BrokenPipeError, OSError):
                    pass
            with anyio.move_on_after(self.config.kill_grace):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for stream in (proc.stdout, proc.stderr):
                await stream.aclose()
            launched.close_config()
            await launched.cgroup.remove()
            if launched.net is not None:
                await launched.net.aclose()

    def start_soon(self, func, *args) -> None:  # type: ignore[no-untyped-def]
        """Background work in the Manager's task group; skipped once it has ended."""
        try:
            self.tg.start_soon(func, *args)
        except (RuntimeError, AttributeError):  # not entered, or ended (a run outlived close())
            pass

    def close_fd_later(self, fd: int) -> None:
        """Close an fd in a worker thread (see BootWatch.detach for why)."""
        if fd < 0:
            return

        async def close() -> None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(os.close, fd)

        try:
            self.tg.start_soon(close)
        except RuntimeError:  # the Manager's task group has ended (a run outlived close())
            os.close(fd)


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
