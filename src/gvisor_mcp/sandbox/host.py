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
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from .cgroups import Cgroup, detect_version
from .config import ManagerConfig
from .errors import SandboxError
from .network import NetworkProvider
from .outfile import can_punch
from .ownership import OwnerLock, new_container_id
from .rootfs import host_system_entries, write_etc
from .runsc import Runsc, missing_launcher_tools
from .spares import Spares


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
        self.spares = Spares(self.base, self.system, self.new_container_id)
        """Cold runs' empty roots, made ahead (spares.py)."""

    @property
    def instance(self) -> str:
        return self.owner.instance

    def new_container_id(self) -> str:
        return new_container_id(self.owner.instance)

    def cgroup(self, container_id: str) -> Cgroup:
        return Cgroup(f"/{self.config.cgroup_parent}/{container_id}", self.cgroup_version)

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
