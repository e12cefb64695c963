"""The seam between Jobs and where a job runs: this host's Manager, or a cluster.

`Jobs` has admitted a job under the policy (quota, fair gate); a `JobRunner`
places it and runs it. `LocalRunner` is the single-host server: one
`sandbox.ManagerAPI` on this host. `gvisor_mcp.cluster.frontend.RayRunner`
sends it to a HostAgent on another host (imports Ray; only built by
`runtime.start_runtime` for `serve --backend ray`).

It lives here, not next to `sandbox/api.ManagerAPI`, because a placement
needs who asks (tenant, session: the cluster's quotas and workspace homes)
and has two outcomes the sandbox never has. Jobs records them like any other
end of a job:

- `RunRefused`: nothing was started (a cluster-wide quota, no healthy host,
  the agent refused the spec); the message says why and what to do;
- `HostLost`: the host died or went silent mid-run; whether the command ran
  is unknown, and it is never run again by us.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .errors import InfrastructureError, Refusal
from .sandbox import ContainerOptions, ContainerResult, ContainerStatus, ManagerAPI, ManagerConfig
from .sandbox.api import RunView


class RunRefused(Refusal):
    """The job was not started anywhere; the message is for the caller.
    Jobs records it as the job's error (it never reaches tools/refuse.py)."""

    kind = "cluster"


class HostLost(InfrastructureError):
    """The host running the job was lost; outcome unknown, never re-run.
    Jobs records it as the job's end, status host_lost."""

    status = ContainerStatus.HOST_LOST


@runtime_checkable
class JobRunner(Protocol):
    """What Jobs, the per-tenant state and list_active call on where jobs run."""

    @property
    def config(self) -> ManagerConfig:
        """Jobs reads max_concurrent_containers (its local gate), default_resources, kill_grace."""
        ...

    @property
    def closed(self) -> bool: ...

    def active_containers(self) -> int: ...

    def capacity(self) -> int:
        """Sandboxes that can run at once where jobs run (list_active's capacity_max)."""
        ...

    def idle_pooled(self) -> int: ...

    def frozen_pooled(self) -> int: ...

    def active_run(self, run_id: str) -> RunView | None: ...

    async def run_job(
        self, options: ContainerOptions, *, run_id: str, tenant: str, session: str | None
    ) -> ContainerResult: ...

    async def kill_job(self, run_id: str) -> bool: ...

    def warm(self, template: ContainerOptions, size: int) -> None: ...

    async def cleanup_stale(self) -> int: ...

    async def close(self) -> None: ...


class LocalRunner:
    """Jobs run by this host's Manager (the single-host server)."""

    def __init__(self, manager: ManagerAPI) -> None:
        self.manager = manager

    @property
    def config(self) -> ManagerConfig:
        return self.manager.config

    @property
    def closed(self) -> bool:
        return self.manager.closed

    def active_containers(self) -> int:
        return self.manager.active_containers()

    def capacity(self) -> int:
        return self.manager.config.max_concurrent_containers

    def idle_pooled(self) -> int:
        return self.manager.idle_pooled()

    def frozen_pooled(self) -> int:
        return self.manager.frozen_pooled()

    def active_run(self, run_id: str) -> RunView | None:
        return self.manager.active_run(run_id)

    async def run_job(
        self, options: ContainerOptions, *, run_id: str, tenant: str, session: str | None
    ) -> ContainerResult:
        return await self.manager.run(options, run_id=run_id)

    async def kill_job(self, run_id: str) -> bool:
        return await self.manager.kill(run_id, ContainerStatus.KILLED)

    def warm(self, template: ContainerOptions, size: int) -> None:
        self.manager.warm(template, size)

    async def cleanup_stale(self) -> int:
        return await self.manager.cleanup_stale()

    async def close(self) -> None:
        await self.manager.close()


def as_runner(where: ManagerAPI | JobRunner) -> JobRunner:
    """A JobRunner for either: a Manager (or a test's FakeManager) is wrapped."""
    return where if isinstance(where, JobRunner) else LocalRunner(where)


__all__ = ["HostLost", "JobRunner", "LocalRunner", "RunRefused", "as_runner"]
