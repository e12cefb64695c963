"""What the layers above need from a Manager, as a `typing.Protocol`.

The runtime (jobs, per-tenant state, the tools) is written against
`ManagerAPI`, not against `Manager`: the real one runs gVisor sandboxes, and
a test double that cannot run them (named `Fake...`, see tests/) implements
the same few methods, so everything above the sandbox can be tested without
root or runsc. `Manager` satisfies it structurally; tests/unit check that.

Keep it small: a method belongs here only when code outside `sandbox/` calls
it on a Manager it was given.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .config import ManagerConfig
from .options import ContainerOptions
from .result import ContainerResult, ContainerStatus


class RunView(Protocol):
    """A run in flight, as the runtime sees it (a `Container` while it runs)."""

    @property
    def container_id(self) -> str: ...


@runtime_checkable
class ManagerAPI(Protocol):
    """One Manager: capacity, runs in flight, the warm pool, shutdown."""

    @property
    def config(self) -> ManagerConfig:
        """Capacity (`max_concurrent_containers`), default resources, grace periods."""
        ...

    @property
    def closed(self) -> bool:
        """True once close() began: runs still finishing were killed by shutdown."""
        ...

    def active_containers(self) -> int:
        """Containers running now (metrics, list_active's capacity)."""
        ...

    def idle_pooled(self) -> int:
        """Warm sandboxes booted and waiting for a claim (metrics)."""
        ...

    def frozen_pooled(self) -> int:
        """Pooled sandboxes frozen now, idling (metrics)."""
        ...

    def active_run(self, run_id: str) -> RunView | None:
        """The run with this id while it is in flight, else None."""
        ...

    async def run(self, options: ContainerOptions, *, run_id: str | None = None) -> ContainerResult:
        """Run one command in a fresh sandbox. A command that fails is a result;
        refusals raise `SandboxRefusal`, infrastructure failures `SandboxError`."""
        ...

    def warm(self, template: ContainerOptions, size: int) -> None:
        """Keep `size` sandboxes booted for requests shaped like `template` (0 stops)."""
        ...

    async def kill(self, run_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        """Kill a run in flight; its run() returns with `reason`. False if none."""
        ...

    async def cleanup_stale(self) -> int:
        """Remove what dead Managers left behind; how many containers."""
        ...

    async def close(self) -> None:
        """Kill what runs and stop taking runs (idempotent)."""
        ...


__all__ = ["ManagerAPI", "RunView"]
