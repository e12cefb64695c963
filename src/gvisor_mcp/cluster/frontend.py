"""The front end's side of the cluster: place each job on an agent, run it
there at most once, and page its output from wherever it ran.

`RayRunner` is what `Jobs` calls instead of the local Manager (the seam in
gvisor_mcp.runner): the policy has already been applied by the caller; here
the run becomes a `RunSpec` (names, never host paths), gets a lease from the
coordinator (fair share, quotas, workspace affinity across the cluster) and
goes to that host's agent.

At most once: the agent actor has `max_restarts=0, max_task_retries=0`, and
nothing here ever sends a spec twice. When the host dies or stops answering
mid-run, the call ends with `HostLost` ("outcome: unknown"): Ray's own
words are that the task "may or may not have been executed", and so are
ours. Bound: the run's timeout + 2 x kill grace + LOST_MARGIN; Ray itself
reports a killed node in ~2 s and a frozen one in ~6 s (docs/scale-out.md).

Front ends know nothing of each other: they share agents and the coordinator.

Why over ~400 lines: placement, leases, host_lost detection and remote
paging share the in-flight table and its placements database; they are one
contract (at most once, never a lost result) and read best together.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from ..results import ResultStore, StoredResult
from ..runner import HostLost, RunRefused
from ..sandbox import ContainerOptions, ContainerResult, ContainerStatus, ManagerConfig, SandboxError
from . import AGENT_NAME_PREFIX, COORDINATOR_NAME, NAMESPACE
from .agent import MAX_PAGE
from .spec import BUILTIN_IMAGE, RunSpec, SpecRefused, WorkspaceRef

log = structlog.get_logger("gvisor_mcp.cluster.frontend")

LOST_MARGIN = 20.0
"""Seconds past a run's own deadline after which a silent host counts as lost."""
REFRESH = 1.0
"""Seconds between agent health polls and lease renewals."""
HEALTH_TIMEOUT = 5.0
INLINE_KEEP = 256
"""Finished runs whose small output (the agent's INLINE_MAX) this front end keeps
in memory for their first reads; older ones are paged from their host."""
COORDINATOR_RESERVE = 1
"""The cluster's last free slot waits for a tenant below its fair share
(coordinator.py); constant, like everything Ray runs for us."""


def connect(address: str) -> None:
    """Join the cluster as a driver (token from RAY_AUTH_TOKEN_PATH etc.).

    Raises ConnectionError with what to check. Ray's logs of other processes
    are not copied to our stderr (log_to_driver=False).
    """
    import ray

    if ray.is_initialized():
        return
    import signal

    # ray.init installs its own SIGTERM handling (Python's, and its C++ core's
    # crash handler, which aborted a cleanly stopping server: exit -6). The
    # server's signal handling stays ours: put back what was there before.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:
        raise ConnectionError(
            f"could not join the Ray cluster at {address}: {type(e).__name__}: {str(e)[:300]}. "
            "Check the address, that RAY_AUTH_MODE=token is set and the cluster token is readable "
            "(RAY_AUTH_TOKEN_PATH), and that the head node is up"
        ) from None
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def coordinator_handle() -> Any:
    """The cluster's coordinator, created on the head node by the first front end."""
    import ray

    from .coordinator import Coordinator

    return (
        ray.remote(Coordinator)
        .options(
            name=COORDINATOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=10000,
        )
        .remote(reserve=COORDINATOR_RESERVE)
    )


@dataclass
class Agent:
    host: str
    handle: Any
    health: dict[str, Any] = field(default_factory=dict)
    usable: bool = False
    why: str | None = "not checked yet"


@dataclass
class RemoteRun:
    """A run in flight on some host, as list_active and cancel see it."""

    run_id: str
    host: str
    started_at: float
    container_id: str = ""
    lease: str | None = None


class RayRunner:
    """Places jobs on agents. Use inside `async with` (it polls agents and renews leases)."""

    def __init__(
        self,
        policy: Any,
        workspace_root: Path,
        state_dir: Path,
        *,
        expected_runsc_version: str | None,
        kill_grace: float = 3.0,
    ) -> None:
        self.policy = policy
        self.workspace_root = workspace_root.resolve()
        self.expected = expected_runsc_version
        self.frontend = f"fe-{os.uname().nodename[:32]}-{os.getpid()}-{secrets.token_hex(4)}"
        # Jobs reads capacity and defaults from here; the cluster's real
        # capacity is enforced by the coordinator, so the local gate is wide.
        self.config = ManagerConfig(max_concurrent_containers=4096, kill_grace=kill_grace)
        self.agents: dict[str, Agent] = {}
        self._active: dict[str, RemoteRun] = {}
        self._closed = False
        self._warm: tuple[Any, int] | None = None
        self._releasing: set[str] = set()
        self._inline: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        """Leases of ended runs whose release the coordinator has not confirmed yet."""
        self.coordinator: Any = None
        self._tg: anyio.abc.TaskGroup | None = None
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(state_dir / "placements.db", timeout=10, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # As the result store: no fsync per placement row (a crash of this
        # process loses none; a power loss can lose the last ones, like results).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS placements (result_id TEXT PRIMARY KEY, host TEXT NOT NULL, "
            "tenant_dir TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    # --- life cycle ---------------------------------------------------------------

    async def __aenter__(self) -> RayRunner:
        self.coordinator = await anyio.to_thread.run_sync(coordinator_handle)
        await self.refresh()
        self._tg = await anyio.create_task_group().__aenter__()
        self._tg.start_soon(self._upkeep)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)

    @property
    def closed(self) -> bool:
        return self._closed

    async def cleanup_stale(self) -> int:
        """Nothing to reap here: each agent reaps its own host when it starts."""
        return 0

    async def close(self) -> None:
        """Stop placing runs; kill ours still running on their hosts."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for run in list(self._active.values()):
                await self._kill_on(run)
            if self._releasing:  # a release queued but not yet sent would wait for LEASE_TTL
                with anyio.move_on_after(HEALTH_TIMEOUT):
                    try:
                        await self.coordinator.release_many.remote(sorted(self._releasing))
                        self._releasing.clear()
                    except Exception as e:
                        log.warning("cluster_release_failed", leases=len(self._releasing), error=str(e))
            self._db.close()

    async def _upkeep(self) -> None:
        while not self._closed:
            await anyio.sleep(REFRESH)
            try:
                await self.refresh()
                await self.coordinator.renew.remote(self.frontend, [r.lease for r in self._active.values() if r.lease])
            except Exception as e:  # the next round tries again
                log.warning("cluster_upkeep_failed", error=f"{type(e).__name__}: {e}")

    async def refresh(self) -> None:
        """Find agents (named actors) and check each one's health."""
        import ray

        names = await anyio.to_thread.run_sync(ray.util.list_named_actors)
        hosts = {n[len(AGENT_NAME_PREFIX) :] for n in names if n.startswith(AGENT_NAME_PREFIX)}
        for host in list(self.agents):
            if host not in hosts:
                del self.agents[host]
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(self._check, host)
        if self._warm is not None:
            for agent in self.agents.values():
                if agent.usable and not agent.health.get("warmed"):
                    await self._warm_one(agent)

    async def _check(self, host: str) -> None:
        import ray

        agent = self.agents.get(host)
        if agent is None:
            try:
                handle = await anyio.to_thread.run_sync(
                    lambda: ray.get_actor(AGENT_NAME_PREFIX + host, namespace=NAMESPACE)
                )
            except ValueError:
                return
            agent = self.agents[host] = Agent(host, handle)
        warmed = agent.health.get("warmed")
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                health = await agent.handle.health.remote()
        except Exception as e:
            agent.usable, agent.why = False, f"does not answer: {type(e).__name__}"
            return
        health["warmed"] = warmed and health.get("instance") == agent.health.get("instance")
        agent.health = health
        agent.usable, agent.why = True, None
        if not health.get("ready"):
            agent.usable, agent.why = False, "not started"
        elif not health.get("canary_ok"):
            agent.usable, agent.why = False, f"its canary failed: {health.get('canary')}"
        elif self.expected is not None and health.get("runsc_version") != self.expected:
            agent.usable, agent.why = (
                False,
                (f"runsc differs: {health.get('runsc_version')!r}, this front end expects {self.expected!r}"),
            )

    def usable_hosts(self) -> dict[str, int]:
        return {h: int(a.health.get("capacity", 0)) for h, a in self.agents.items() if a.usable}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"host": h, "usable": a.usable, "why": a.why, "free": a.health.get("free")}
            for h, a in sorted(self.agents.items())
        ]

    # --- what Jobs calls (gvisor_mcp.runner.JobRunner) ---------------------------------

    def active_containers(self) -> int:
        return len(self._active)

    def active_run(self, run_id: str) -> RemoteRun | None:
        return self._active.get(run_id)

    def active_runs(self) -> list[RemoteRun]:
        return list(self._active.values())

    def capacity(self) -> int:
        """What the healthy agents can run at once (their own max_concurrent_containers)."""
        return sum(self.usable_hosts().values())

    def idle_pooled(self) -> int:
        """Warm pools live on the agents; the server's metrics see none here."""
        return 0

    def frozen_pooled(self) -> int:
        return 0

    async def run_job(
        self, options: ContainerOptions, *, run_id: str, tenant: str, session: str | None
    ) -> ContainerResult:
        return await self.run(options, run_id=run_id, tenant=tenant, session=session)

    async def kill_job(self, run_id: str) -> bool:
        return await self.kill(run_id)

    def warm(self, template: ContainerOptions, size: int) -> None:
        """Agents keep their own warm pools for this shape (one template per front end)."""
        self._warm = (template, size) if size > 0 else None
        for agent in self.agents.values():
            agent.health["warmed"] = False

    async def _warm_one(self, agent: Agent) -> None:
        assert self._warm is not None
        template, size = self._warm
        try:
            spec = self.spec_for(template, "res_" + "0" * 32, self._tenant_of(template))
            with anyio.fail_after(60):
                agent.health["warmed"] = await agent.handle.warm.remote(spec.model_dump(), size)
        except Exception as e:
            log.warning("cluster_warm_failed", host=agent.host, error=f"{type(e).__name__}: {e}")
            agent.health["warmed"] = True  # do not retry every second

    # --- one run --------------------------------------------------------------------------

    async def run(
        self, options: ContainerOptions, *, run_id: str, tenant: str, session: str | None = None
    ) -> ContainerResult:
        """Run on the host the coordinator picks. RunRefused (quota, no host,
        spec refused by the agent), HostLost, or SandboxError."""
        if self._closed:
            raise RunRefused("the front end is shutting down; nothing was started")
        import ray.exceptions as rex

        spec = self.spec_for(options, run_id, tenant)
        settings = self.policy.current.tenant(tenant)
        quotas = getattr(settings, "quotas", None)
        hosts = self.usable_hosts()
        if not hosts:
            raise RunRefused(self._no_host_text())
        run = RemoteRun(run_id=run_id, host="", started_at=time.time())
        self._active[run_id] = run
        try:
            carried = list(self._releasing)
            grant = await self.coordinator.acquire.remote(
                self.frontend,
                spec.tenant,
                hosts,
                workspace=spec.workspace.key if spec.workspace else None,
                max_concurrent=getattr(quotas, "max_concurrent", None),
                per_minute=getattr(quotas, "runs_per_minute", None),
                released=carried,
            )
            self._releasing.difference_update(carried)
            if "refused" in grant:
                raise RunRefused(grant["refused"])
            run.host, run.lease = grant["host"], grant["lease"]
            agent = self.agents.get(run.host)
            if agent is None or not agent.usable:
                raise RunRefused(f"host {run.host!r} left the cluster before the run started; nothing was started")
            self._db.execute(
                "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?)", (run_id, run.host, spec.tenant, time.time())
            )
            bound = (
                (spec.resources.timeout or self.config.default_resources.timeout)
                + 2 * self.config.kill_grace
                + LOST_MARGIN
            )
            ref = agent.handle.run.remote(spec.model_dump())
            t0 = time.monotonic()
            try:
                with anyio.fail_after(bound):
                    answer = await ref
            except TimeoutError:
                agent.usable, agent.why = False, "lost: did not answer a run in time"
                await self._kill_on(run)
                raise HostLost(self._lost_text(run, f"it did not answer within {bound:.0f} s")) from None
            except (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError) as e:
                agent.usable, agent.why = False, f"lost: {type(e).__name__}"
                await self.coordinator.forget_host.remote(run.host)
                raise HostLost(
                    self._lost_text(run, f"Ray reported {type(e).__name__} after {time.monotonic() - t0:.1f} s")
                ) from None
            except rex.RayTaskError as e:
                cause = e.cause if hasattr(e, "cause") else None
                if isinstance(cause, SpecRefused) or isinstance(e, SpecRefused):
                    raise RunRefused(f"host {run.host!r}: {cause or e}") from None
                raise SandboxError(f"on host {run.host!r}: {cause or e}") from None
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._kill_on(run)
                raise
            answer.pop("host", None)
            inline = answer.pop("inline", None)
            if inline is not None:  # a finished run's output never changes: keep it for the first reads
                self._inline[run_id] = inline
                while len(self._inline) > INLINE_KEEP:
                    self._inline.popitem(last=False)
            return ContainerResult(**answer)
        finally:
            self._active.pop(run_id, None)
            if run.lease is not None:
                await self._release(run.lease)

    async def _release(self, lease: str) -> None:
        """Free a lease off the answer path (one round trip less per run).

        Ray does not keep the order of calls to an async actor, so a release
        sent now could be counted after this front end's next acquire, and a
        tenant at its quota refused: until the coordinator confirms it, the
        lease rides along with every acquire of this front end (`released`),
        which frees it before counting. Another front end sees the slot free
        once the release lands (one round trip after the answer).
        """
        self._releasing.add(lease)
        if self._tg is None:  # not inside `async with`: nothing runs in the background
            await self._send_release(lease)
        else:
            self._tg.start_soon(self._send_release, lease)

    async def _send_release(self, lease: str) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(HEALTH_TIMEOUT):
            try:
                await self.coordinator.release.remote(lease)
                self._releasing.discard(lease)
            except Exception as e:  # the next acquire carries it; renew drops it at the latest
                log.warning("cluster_release_failed", lease=lease, error=f"{type(e).__name__}: {e}")

    async def kill(self, run_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        run = self._active.get(run_id)
        if run is None or not run.host:
            return False
        return await self._kill_on(run)

    async def _kill_on(self, run: RemoteRun) -> bool:
        agent = self.agents.get(run.host)
        if agent is None:
            return False
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                return bool(await agent.handle.kill.remote(run.run_id))
        except Exception:
            return False

    # --- output, where it stayed ----------------------------------------------------------------

    def host_of(self, result_id: str) -> tuple[str, str] | None:
        row = self._db.execute("SELECT host, tenant_dir FROM placements WHERE result_id=?", (result_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def read_remote(self, result_id: str, stream: str, offset: int, length: int) -> tuple[bytes, int] | None:
        """A page from the host that ran `result_id`; None when it did not run
        remotely. A lost host's output reads as empty."""
        import ray

        small = self._inline.get(result_id)
        if small is not None:
            data = small.get(stream, b"")
            return data[max(0, offset) : max(0, offset) + max(0, length)], len(data)
        placed = self.host_of(result_id)
        if placed is None:
            return None
        host, tenant_dir = placed
        agent = self.agents.get(host)
        if agent is None:
            return b"", 0
        try:
            page = ray.get(
                agent.handle.read.remote(result_id, tenant_dir, stream, offset, min(length, MAX_PAGE)),
                timeout=HEALTH_TIMEOUT,
            )
        except Exception:
            return b"", 0
        if page is None:
            return b"", 0
        return page["data"], page["total"]

    # --- translation ------------------------------------------------------------------------------

    def _tenant_of(self, options: ContainerOptions) -> str:
        for m in options.extra_mounts:
            parts = Path(m.source).resolve().relative_to(self.workspace_root).parts
            return parts[0]
        return "default"

    def spec_for(self, options: ContainerOptions, run_id: str, tenant: str) -> RunSpec:
        """The run as names: the image by catalog name, the workspace by reference."""
        from ..policy import path_component

        if options.stdin is not None and not isinstance(options.stdin, bytes):
            raise RunRefused("stdin must be bytes to cross to another host")
        image, digest = BUILTIN_IMAGE, None
        if options.rootfs is not None:
            found = [(n, d) for n, (p, d) in self._catalog(tenant).items() if p == options.rootfs]
            if not found:
                raise RunRefused(f"image root {options.rootfs} is not in the policy's catalog")
            image, digest = found[0]
        tdir = path_component(tenant)
        ws = None
        for m in options.extra_mounts:
            if ws is not None or m.type != "bind":
                raise RunRefused("a cluster run mounts at most its workspace")
            if self.workspace_root not in Path(m.source).resolve().parents:
                raise RunRefused(f"mount {m.source} is not a workspace: only workspaces cross to agents")
            size = self.policy.current.tenant(tenant).workspace.size
            ws = WorkspaceRef.of_path(self.workspace_root, tdir, m.source, m.destination, size)
            if ws is None:
                raise RunRefused(f"mount {m.source} is not this tenant's workspace")
        return RunSpec(
            result_id=run_id,
            tenant=tdir,
            command=options.command,
            workdir=options.workdir,
            env=options.env,
            stdin=options.stdin,
            resources=options.resources,
            network=options.network.value,
            image=image,
            user=options.user,
            read_only_rootfs=options.read_only_rootfs,
            workspace=ws,
            image_digest=digest,
            egress=_rules_of(options.egress),
        )

    def _catalog(self, tenant: str) -> dict[str, tuple[str, str | None]]:
        """Image name -> (root directory here, digest) of the tenant's catalog.

        The agent gets the name and, for a store image, the digest the
        policy resolved: it runs its own copy of that content or refuses."""
        out: dict[str, tuple[str, str | None]] = {}
        try:
            catalog = self.policy.current.tenant(tenant).images.catalog
        except Exception:
            return out
        for name, entry in catalog.items():
            if entry.path is not None:
                out[name] = (str(entry.path), None)
            elif entry.store and self.policy.images is not None:
                try:
                    stored = self.policy.images.get(entry.store)
                except Exception:
                    continue
                out[name] = (stored.rootfs, stored.digest)
        return out

    def _no_host_text(self) -> str:
        seen = "; ".join(f"{a['host']}: {a['why']}" for a in self.describe() if not a["usable"]) or "none registered"
        return f"no healthy agent can take runs now (agents: {seen}); nothing was started. Retry later"

    @staticmethod
    def _lost_text(run: RemoteRun, how: str) -> str:
        return (
            f"host_lost: host {run.host!r} was lost while the command ran ({how}). "
            "outcome: unknown — the command may or may not have run, in part or in full; it was not "
            "run again anywhere. Check the workspace before running it again."
        )


def _rules_of(egress: Any) -> Any:
    """The run's EgressRules (Jobs wraps them in an EgressGrant with a local
    callback: only the rules cross to the agent)."""
    if egress is None:
        return None
    return getattr(egress, "rules", egress)


class ClusterResultStore(ResultStore):
    """The front end's results: rows here, output paged from the host that kept it."""

    runner: RayRunner | None = None

    def read(self, result: StoredResult, stream: str, offset: int, length: int) -> tuple[bytes, int]:
        if self.runner is not None:
            page = self.runner.read_remote(result.result_id, stream, offset, length)
            if page is not None:
                return page
        return super().read(result, stream, offset, length)
