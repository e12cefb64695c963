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
    boot_timeout: float = Field(default=30.0, gt=0)
    """Seconds a pooled sandbox may take to boot."""

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
                f"cgroup_parent={self.cgroup_parent!r}: one path component of letters, "
                "digits, '_', '.', '-'"
            )
        return self
