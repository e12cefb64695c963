"""How a Manager runs sandboxes: paths, platform, capacity, grace periods."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .options import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_PIDS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    NetworkMode,
    ResourceSpec,
)


class ManagerConfig(BaseModel):
    """How the Manager runs sandboxes. Paths are host paths owned by the server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    runsc_path: str = "runsc"
    bundle_base_dir: str = "/run/gvisor-mcp/bundles"
    runsc_root: str = "/run/gvisor-mcp/runsc"
    platform: str = "systrap"
    max_concurrent_containers: int = Field(default=8, ge=1, le=4096)
    default_network: NetworkMode = NetworkMode.NONE
    default_resources: ResourceSpec = ResourceSpec(
        memory_mb=DEFAULT_MEMORY_MB,
        max_pids=DEFAULT_MAX_PIDS,
        timeout=DEFAULT_TIMEOUT,
        max_output_bytes=DEFAULT_MAX_OUTPUT,
    )
    cgroup_parent: str = "gvisor-mcp"
    close_grace: float = Field(default=5.0, ge=0)
    """Seconds close() waits for killed runs before force-deleting them."""
    kill_grace: float = Field(default=3.0, gt=0)
    """Seconds a run may take to exit after `runsc kill` before it is force-deleted."""
    pool_max_age: float = Field(default=300.0, gt=0)
    """Seconds a pooled sandbox may wait for a claim before it is recycled."""
    pool_freeze_after: float = Field(default=1.0, ge=0)
    """Seconds a pooled sandbox idles unclaimed before it is frozen (cgroup
    freezer; 0: never). Idle, this runsc's systrap sentry burns ~40-60 ms of
    CPU per second; frozen, none. It is thawed (~1-2 ms) before anything
    talks to it: the claim, its stop, the stale reaper (docs/design-notes.md)."""
    boot_timeout: float = Field(default=30.0, gt=0)
    """Seconds a pooled sandbox may take to boot."""
    cgroup_prejoin: bool = True
    """The `runsc run` client joins the run's cgroup leaf before it execs
    runsc, which then runs with --ignore-cgroups (runsc.Launch): runsc's own
    cgroup work (~25 ms of a cold boot on an idle host) is skipped. The
    client's CPU then counts in the run's cgroup too; where other host
    processes keep the CPUs busy, False (runsc joins the leaf itself, its
    client outside) was faster here (docs/benchmarks.md)."""
    spare_launchers: bool = True
    """A cold run of the common shape (built-in root, output files,
    cgroup_prejoin without report_memory_limit; any network mode, sandbox
    when the Manager has a network provider) takes a bundle whose cgroup
    leaf, output files and `runsc run` launcher were made ahead, the
    launcher joined to the leaf and waiting (spares.py): its fork/exec and
    cgroup migration are off the run's clock, and for network=sandbox the
    namespaces, proxy listener and the launcher's mount namespace too. Each
    Manager keeps two per shape in use: two waiting `/bin/sh` processes and
    their cgroup leaves (network=sandbox: and two prepared namespaces)."""
    output_files: bool = True
    """A cold run's stdout/stderr go to files in its bundle, followed and
    capped by us (outfile.py): a flood runs at raw runsc's speed writing a
    file instead of waking our reader per pipe-full. Pooled (warm) runs and
    runs whose writers want every byte (the CLI) use pipes. The file's pages
    count in the run's memory cgroup (at most the tail's half of the output
    cap plus ~50 ms of output)."""
    report_memory_limit: bool = False
    """With cgroup_prejoin, runsc no longer reads the run's memory limit, so
    the sandbox's /proc/meminfo shows the host's memory as MemTotal (as in
    most containers; the limit is enforced all the same). True shows the
    limit, through a private mount namespace per `runsc run` client
    (runsc.Launch), which cost 10-80 ms per cold run here (docs/benchmarks.md).
    (Without cgroup_prejoin runsc reads the limit itself.)"""

    @model_validator(mode="after")
    def _paths(self) -> ManagerConfig:
        for name in ("bundle_base_dir", "runsc_root"):
            value = getattr(self, name)
            if not value.startswith("/"):
                raise ValueError(f"{name}={value!r}: must be an absolute path")
        if self.platform not in ("systrap", "ptrace", "kvm"):
            raise ValueError(f"platform={self.platform!r}: use systrap, ptrace or kvm")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.cgroup_parent):
            raise ValueError(
                f"cgroup_parent={self.cgroup_parent!r}: one path component of letters, digits, '_', '.', '-'"
            )
        return self
