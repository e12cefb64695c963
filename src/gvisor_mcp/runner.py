"""The seam between Jobs and where a job runs: this host's Manager, or a cluster.

`Jobs` has admitted a job under the policy (quota, fair gate); a `JobRunner`
places it and runs it. `LocalRunner` is today's behaviour, one Manager on
this host. `gvisor_mcp.cluster.frontend.RayRunner` sends it to a HostAgent
on another host (imports Ray; only built for `serve --backend ray`).

Two outcomes exist only when the run is elsewhere, and Jobs records them
like any other end of a job:

- `RunRefused`: nothing was started (a cluster-wide quota, no healthy host,
  the agent refused the spec); the message says why and what to do;
- `HostLost`: the host died or went silent mid-run; whether the command ran
  is unknown, and it is never run again by us.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .sandbox import ContainerOptions, ContainerResult, ContainerStatus, Manager


class RunRefused(Exception):
    """The job was not started anywhere; the message is for the caller."""


class HostLost(Exception):
    """The host running the job was lost; outcome unknown, never re-run."""

    status = "host_lost"


@runtime_checkable
class JobRunner(Protocol):
    config: Any
    """A ManagerConfig: Jobs reads max_concurrent_containers, default_resources, kill_grace."""

    @property
    def closed(self) -> bool: ...

    def active_containers(self) -> int: ...

    def active_run(self, run_id: str) -> Any | None:
        """Something with a `container_id` while the job runs, else None."""

    async def run_job(self, job: Any, options: ContainerOptions) -> ContainerResult: ...

    async def kill_job(self, job: Any) -> bool: ...


class LocalRunner:
    """Jobs run by this host's Manager (the single-host server)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.config = manager.config

    @property
    def closed(self) -> bool:
        return self.manager.closed

    def active_containers(self) -> int:
        return self.manager.active_containers()

    def active_run(self, run_id: str) -> Any | None:
        return self.manager.active_run(run_id)

    async def run_job(self, job: Any, options: ContainerOptions) -> ContainerResult:
        return await self.manager.run(options, run_id=job.result_id)

    async def kill_job(self, job: Any) -> bool:
        return await self.manager.kill(job.result_id, ContainerStatus.KILLED)
