"""The front end's side of the file tools with `--backend ray`: find the host
that holds the caller's workspace and have its agent do the operation.

A workspace lives on one host, its home, which the coordinator keeps for
runs too (coordinator.py). Here:

- a workspace with a home: the op goes to that host's agent;
- a workspace without one (first touched by a file tool, or the
  coordinator restarted and lost its homes): the healthy agents are asked
  whether one of them holds it; if one does, it becomes the home; if none
  does, the coordinator places it as it would place a run (the host with
  the most free slots) and records the home, so the next run that mounts it
  goes there. A read-only look (resources) places nothing: "no workspace";
- the home is lost or unhealthy: an error naming the host, at once (or
  within CALL_TIMEOUT if it stops answering mid-call), never a hang; the
  workspace is never moved (its files are there);
- no retries: an agent actor has max_task_retries=0 and nothing here sends
  a request twice. A read that failed can simply be asked again; a write or
  delete that was cut off may or may not have happened, and the error says
  so rather than repeating it blindly.

Session workspaces go when their session ends (runtime.TenantState.drop_session
calls `remove`): every agent is told, without waiting (the one holding it
unmounts and deletes it, the others have nothing to do), and the coordinator
forgets its home. `flush` waits for those calls before the driver leaves
the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import structlog

from .. import files
from ..errors import InfrastructureError
from ..fileop import FileOp
from ..sandbox import UserSpec
from .agent_files import FileRequest
from .spec import SpecRefused, WorkspaceRef

log = structlog.get_logger("gvisor_mcp.cluster.remote_files")

CALL_TIMEOUT = 30.0
"""Seconds a file operation may take on its agent before the host counts as not answering."""
FIND_TIMEOUT = 5.0
MOUNT = "/workspace"
"""A FileRequest's workspace mount (runs carry their own; the file tools need none)."""


class WorkspaceHostUnavailable(InfrastructureError):
    """The workspace's host is lost, unhealthy or did not answer; the text says
    which host and what became of the operation."""

    def for_agent(self) -> str:
        return str(self)


class RemoteWorkspaces:
    """File operations and session workspace removal on the agents, for a RayRunner."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._pending: list[Any] = []

    def ref(self, tenant: str, path: Path, size_mb: int) -> WorkspaceRef:
        """The reference of the front end's workspace directory `path` (as runs name it)."""
        from ..policy import path_component

        ws = WorkspaceRef.of_path(self.runner.workspace_root, path_component(tenant), path, MOUNT, max(1, size_mb))
        if ws is None:
            raise ValueError(f"{path} is not a workspace of tenant {tenant!r}")
        return ws

    # --- the file tools ----------------------------------------------------------------

    async def file_op(
        self, tenant: str, path: Path, size_mb: int, owner: tuple[int, int], op: FileOp | None, *, create: bool
    ) -> Any:
        """`op` on the workspace at `path`, on its home host: its result (as
        fileop.apply returns it), None when `create` is false and no host holds
        the workspace. FileError as the local tools raise it; a Refusal when
        the agent refuses; WorkspaceHostUnavailable when the host is not there."""
        ws = self.ref(tenant, path, size_mb)
        home = await self._home(ws, create=create)
        if home is None:
            return None
        request = FileRequest(
            tenant=ws.tenant, workspace=ws, owner=UserSpec(uid=owner[0], gid=owner[1]), op=op, create=create
        )
        answer = await self._call(home, request)
        if answer.get("absent"):
            return None
        if "error" in answer:
            kind, text = answer["error"]
            raise files.FileError(str(kind), str(text))
        return answer["ok"]

    async def prepare(self, tenant: str, path: Path, size_mb: int, owner: tuple[int, int]) -> None:
        """Make the workspace on its (new) home host now (create_workspace)."""
        await self.file_op(tenant, path, size_mb, owner, None, create=True)

    async def _home(self, ws: WorkspaceRef, *, create: bool) -> str | None:
        coordinator = self.runner.coordinator
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                home = await coordinator.home_of.remote(ws.key)
                if home is not None:
                    return str(home)
                usable = self.runner.usable_hosts()
                found = await self._find(ws, usable)
                if found is None and not create:
                    return None
                if found is None and not usable:
                    raise WorkspaceHostUnavailable(
                        self.runner._no_host_text().replace("nothing was started", "no file was touched")
                    )
                placed = await coordinator.place.remote(ws.key, {found: usable[found]} if found else usable)
        except TimeoutError:
            raise WorkspaceHostUnavailable(
                f"the cluster's coordinator did not answer within {CALL_TIMEOUT:g} s; no file was touched. Retry later"
            ) from None
        if placed is None:
            raise WorkspaceHostUnavailable(self.runner._no_host_text())
        log.info("workspace_homed", workspace=ws.key, host=placed, found=found is not None)
        return str(placed)

    async def _find(self, ws: WorkspaceRef, usable: dict[str, int]) -> str | None:
        """A healthy agent that already holds the workspace, if any."""
        found: list[str] = []

        async def ask(host: str) -> None:
            agent = self.runner.agents.get(host)
            try:
                with anyio.fail_after(FIND_TIMEOUT):
                    if agent is not None and await agent.handle.has_workspace.remote(ws.model_dump()):
                        found.append(host)
            except Exception as e:  # not answering: it is not given the workspace either
                log.warning("workspace_find_failed", host=host, error=f"{type(e).__name__}: {e}")

        async with anyio.create_task_group() as tg:
            for host in sorted(usable):
                tg.start_soon(ask, host)
        return sorted(found)[0] if found else None

    async def _call(self, host: str, request: FileRequest) -> dict[str, Any]:
        import ray.exceptions as rex

        op = request.op
        changes = op is not None and op.kind in ("write", "delete")
        agent = self.runner.agents.get(host)
        if agent is None or not agent.usable:
            why = agent.why if agent is not None else "not in the cluster now"
            raise WorkspaceHostUnavailable(
                f"this workspace lives on host {host!r}, which is not available now ({why}); its files are "
                "there, and nothing was done. Retry when the host is back"
            )
        unknown = (
            " The operation may or may not have happened on that host: read the file (or list the directory) "
            "when the host is back before doing it again."
            if changes
            else " Nothing was changed; ask again when the host is back."
        )
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                return dict(await agent.handle.files.remote(request.model_dump()))
        except TimeoutError:
            raise WorkspaceHostUnavailable(
                f"host {host!r}, which holds this workspace, did not answer within {CALL_TIMEOUT:g} s." + unknown
            ) from None
        except (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError) as e:
            agent.usable, agent.why = False, f"lost: {type(e).__name__}"
            raise WorkspaceHostUnavailable(
                f"host {host!r}, which holds this workspace, was lost during the call (Ray reported "
                f"{type(e).__name__})." + unknown
            ) from None
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, SpecRefused):
                raise SpecRefused(f"host {host!r}: {cause}") from None
            raise WorkspaceHostUnavailable(f"on host {host!r}: {cause or e}." + unknown) from None

    # --- session workspaces ----------------------------------------------------------------

    def remove(self, tenant: str, path: Path) -> None:
        """A session's workspace goes: every agent is told (sent, not awaited;
        only the host holding it has anything to do); a tenant's is kept."""
        try:
            ws = self.ref(tenant, path, 1)
        except ValueError:
            return
        if ws.scope != "session":
            return
        self._reap(0)
        for agent in list(self.runner.agents.values()):
            self._pending.append(agent.handle.release_workspace.remote(ws.model_dump()))
        if self.runner.coordinator is not None:
            self._pending.append(self.runner.coordinator.forget_home.remote(ws.key))
        log.info("workspace_remove_sent", workspace=ws.key, agents=len(self.runner.agents))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (blocking, at shutdown) for the removals sent."""
        self._reap(timeout)

    def _reap(self, timeout: float) -> None:
        import ray

        if not self._pending:
            return
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=timeout)
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except Exception as e:  # a lost agent: its successor reaps dead sessions' workspaces
                log.warning("workspace_remove_failed", error=f"{type(e).__name__}: {str(e)[:300]}")
