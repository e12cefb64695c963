"""The shared runtime and each tenant's state: what a tool call runs against.

`Runtime` is what every caller of one server process shares: one Manager
(one global capacity), one result store, one audit log, one set of jobs,
metrics. `TenantState` is one tenant's view of it (its policy, workspaces,
warm pool, sessions): the lifespan context every tool receives
(tools/context.py types it). Nothing here knows MCP: refusals are raised
as gvisor_mcp.errors.Refusal and the tool layer turns them into what the
agent reads (tools/refuse.py).

Why over ~400 lines: the per-tenant state's workspace and warm-pool
bookkeeping are one concept (what a tenant holds on this host) and read
best next to each other.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import workspace as _workspace
from .audit import AuditLog
from .config import ServeConfig
from .errors import ConfigurationError, InfrastructureError, Refusal
from .images.errors import ImageError
from .images.store import Holding, ImageStore
from .jobs import Jobs
from .metrics import Metrics
from .network import NetworkConfig, NetworkService
from .policy import ExecRequest, Policy, Resolved, load, load_default, path_component, resolve, workspace_host_path
from .policy.resolve import SESSIONS_DIR, WorkspacePlan
from .results import ResultStore
from .roots import DEFAULT_WORKSPACE, AgentWorkspaces
from .runner import JobRunner
from .sandbox import Manager, ManagerAPI

log = structlog.get_logger("gvisor_mcp.runtime")


class WorkspaceUnavailable(InfrastructureError):
    """The run's workspace could not be mounted (the operator's log has the
    host paths); str() is written for the agent, without them."""

    def for_agent(self) -> str:
        return str(self)


class WorkspaceLimit(Refusal):
    """A new workspace mount past --max-workspaces(-per-tenant)."""

    kind = "workspace"
    decision = "quota"


class ImageUnavailable(Refusal):
    """The run's store image left the store between resolve() and the run."""


class PolicyHolder:
    """The current policy; reload() swaps it only when the new file is valid.

    With the server's image store, a file whose catalog names a store image
    that is not in the store is not valid (serve refuses to start with it; a
    reload keeps the previous policy), and says how to build or pull it.
    """

    def __init__(self, path: str | None, images: ImageStore | None = None) -> None:
        self.path = path
        self.images = images
        self.current: Policy = load(path, images=images) if path else load_default()
        self.listeners: list[Callable[[], None]] = []
        """Called with no argument after a successful reload (e.g. to re-warm the pool)."""

    def reload(self) -> bool:
        if not self.path:
            return False
        try:
            self.current = load(self.path, images=self.images)
        except (ConfigurationError, OSError) as e:  # keep serving with the old policy
            # (anything else is a bug: Signals.guard logs it with its traceback,
            # and the old policy stays too)
            log.error("policy_reload_failed", path=self.path, error=str(e))
            return False
        log.info("policy_reloaded", path=self.path, policy_hash=self.current.sha256)
        for listener in self.listeners:
            listener()
        return True


@dataclass(frozen=True)
class Caller:
    """Who a tool call is for: never taken from tool arguments.

    `session_id` is None for a sessionless HTTP call (protocol 2026-07-28)
    that names no workspace it created; `workspace_name` is stdio's named
    workspace. See roots.py for what each gets.
    """

    tenant: str
    session_id: str | None
    workspace_name: str | None = None


@dataclass
class TenantState:
    config: ServeConfig
    manager: ManagerAPI | JobRunner
    """This host's Manager, or with `--backend ray` the cluster's RayRunner (warm pools live on the agents)."""
    store: ResultStore
    jobs: Jobs
    audit: AuditLog
    policy: PolicyHolder
    tenant: str
    session_id: str
    workspace_root: Path
    made_workspaces: set[Path] = field(default_factory=set)
    warmed: Any = None
    session_from_request: bool = False
    """HTTP: each MCP session (its mcp-session-id) is a session; stdio: the process is."""
    metrics: Metrics | None = None
    created: AgentWorkspaces = field(default_factory=AgentWorkspaces)
    """HTTP: workspaces the agent created with create_workspace (roots.py)."""
    _prepared: dict[Path, Path] = field(default_factory=dict)
    """Workspace paths as resolve() derives them -> mounted directory (prepare_plan's cache)."""
    ended_sessions: set[str] = field(default_factory=set)
    """HTTP sessions that ended while a background command of theirs still ran."""
    images: ImageStore | None = None
    """The image store (`<state-dir>/images`): where catalog `{store: NAME}` images live."""
    pool_holding: Holding | None = None
    """Keeps the warm pool's store image from `image rm` while the pool targets it."""
    pool_digest: str | None = None
    """The store image the warm pool boots (None: the pool uses no store image)."""
    remote_workspaces: Any = None
    """`--backend ray`: the agents' workspaces (cluster/remote_files.RemoteWorkspaces);
    `made_workspaces` then holds this front end's names for the ones it used."""

    @property
    def workspace_name(self) -> str:
        """stdio, scope session: the named workspace this process uses."""
        return self.config.workspace or DEFAULT_WORKSPACE

    def drop_session(self, session_id: str) -> None:
        """An HTTP session ended (DELETE or idle expiry): its session workspace goes,
        or, while a background command of that session still runs, as soon as
        the last one has ended (reap_ended_sessions)."""
        if any(j.session == session_id for j in self.jobs.active_all()):
            self.ended_sessions.add(session_id)
            return
        self.ended_sessions.discard(session_id)
        path = workspace_host_path(self.workspace_root, self.tenant, "session", session_id).resolve()
        if path in self.made_workspaces:
            self.remove_workspace(path)

    def reap_ended_sessions(self) -> None:
        """Free the workspaces of ended sessions whose background commands are done."""
        for session_id in list(self.ended_sessions):
            self.drop_session(session_id)

    def remove_workspace(self, path: Path) -> None:
        """Unmount and delete a session workspace (its image goes with it); with
        `--backend ray` the agent holding it does (sent now, not awaited)."""
        if self.remote_workspaces is not None:
            self.remote_workspaces.remove(self.tenant, path)
        else:
            _workspace.release(path, remove=True)
        self.made_workspaces.discard(path)
        self._prepared = {k: v for k, v in self._prepared.items() if v != path}

    def caller(self, ctx: Any, workspace: str | None = None) -> Caller:
        """Who calls: the tenant, and the session whose workspace the call uses.

        `ctx` is a tool's Context or a lowlevel ServerRequestContext (resources).
        `workspace`: an id from create_workspace (HTTP); raises
        roots.NoSuchWorkspace when it is not one of this tenant's.
        """
        if self.session_from_request:
            self.expire_created()
            if workspace is not None:
                return Caller(self.tenant, self.created.use(workspace))
            rctx = getattr(ctx, "request_context", ctx)
            request = rctx.request
            # Protocol 2026-07-28 over HTTP has no sessions: every request stands
            # alone, and gets no session (so no session-scoped workspace) unless
            # it names one it created.
            sid = request.headers.get("mcp-session-id") if request is not None else None
            return Caller(self.tenant, sid)
        return Caller(self.tenant, self.session_id, self.workspace_name)

    def resolve_args(self, caller: Caller) -> dict[str, Any]:
        """resolve()'s server-given arguments for `caller`."""
        return dict(
            workspace_root=self.workspace_root,
            session_id=caller.session_id,
            workspace_name=caller.workspace_name,
            extra_projects=self.config.projects,
            images=self.images,
        )

    def expire_created(self) -> None:
        """Remove agent-created workspaces unused for too long (not while a command uses one)."""
        busy = {j.session for j in self.jobs.active_all() if j.tenant == self.tenant and j.session}
        for handle in self.created.idle(busy):
            self.created.forget(handle)
            self.remove_workspace(workspace_host_path(self.workspace_root, self.tenant, "session", handle).resolve())

    def prepare_workspace(self, resolved: Resolved) -> None:
        """Mount the run's workspace, if the policy gives it one: a size-limited
        image of the plan's size, its root owned by the sandbox user (see
        workspace.py).

        Only paths under the server's own workspace root are ever created; the
        policy derives them from tenant and session, never from a request.
        """
        if self.config.backend == "ray":
            # The agent that runs it prepares it, on its host; noted here so
            # that it goes with its session (drop_session).
            if resolved.workspace is not None and self.remote_workspaces is not None:
                self.made_workspaces.add(resolved.workspace.host_path.resolve())
            return
        if resolved.workspace is not None:
            user = resolved.options.user
            self.prepare_plan(resolved.workspace, (user.uid, user.gid) if user else (0, 0))

    def prepare_plan(self, plan: WorkspacePlan, owner: tuple[int, int]) -> Path:
        """prepare_workspace for a WorkspacePlan (the file tools have no Resolved);
        returns the mounted directory."""
        if self.config.backend == "ray":
            raise WorkspaceUnavailable(
                "with --backend ray, workspaces live on the agents' hosts; this front end cannot "
                "open one here. Read and write workspace files with execute_command instead"
            )
        known = self._prepared.get(plan.host_path)
        if known is not None and known in self.made_workspaces and os.path.ismount(known):
            return known  # the file tools' fast path: already mounted for this caller
        root = self.workspace_root.resolve()
        target = plan.host_path.resolve()
        if root not in target.parents:
            raise RuntimeError(f"workspace {target} is outside {root}")
        uid, gid = owner
        if target not in _workspace.held():
            self._check_workspace_caps(root)
        try:
            _workspace.ensure(root, target, plan.size_mb, uid, gid, "kept" if plan.kept else plan.scope)
        except (_workspace.WorkspaceError, OSError) as e:
            # The operator's log has the host paths; the caller gets the reason without them.
            log.error("workspace_failed", workspace=str(target), error=str(e))
            reason = str(e.strerror if isinstance(e, OSError) and e.strerror else e)
            reason = reason.replace(str(target), plan.mount).replace(str(root), "<workspaces>")
            raise WorkspaceUnavailable(
                f"the workspace could not be prepared, so nothing was run: {reason}. "
                "Retry later; if it persists, the server's disk may be full (tell the operator)."
            ) from e
        self.made_workspaces.add(target)
        self._prepared[plan.host_path] = target
        return target

    def _check_workspace_caps(self, root: Path) -> None:
        """Refuse a new mount past --max-workspaces(-per-tenant): each is an
        image and a loop device, and HTTP sessions come and go at a client's will."""
        held = _workspace.held()
        tenant_dir = root / path_component(self.tenant)
        mine = sum(1 for p in held if tenant_dir in p.parents)
        s = self.config
        if mine >= s.max_workspaces_per_tenant:
            raise WorkspaceLimit(
                f"the workspace could not be prepared: tenant {self.tenant!r} already has {mine} workspaces "
                f"mounted, the most this server allows per tenant (--max-workspaces-per-tenant "
                f"{s.max_workspaces_per_tenant}); each open session holds one. End a session you no longer "
                "use (HTTP DELETE), or wait until idle ones expire, then call again"
            )
        if len(held) >= s.max_workspaces:
            raise WorkspaceLimit(
                f"the workspace could not be prepared: this server already has {len(held)} workspaces "
                f"mounted, its limit (--max-workspaces {s.max_workspaces}). Try again when sessions have "
                "ended or expired"
            )

    def pool_template(self) -> Resolved:
        """This tenant's default request, resolved: what most calls look like.

        Pooled sandboxes are booted for its shape (image, network, user,
        mounts, process limit); a call that differs in any of those takes the
        cold path. Memory, CPU, timeout, env and workdir are applied at claim.
        """
        resolved = resolve(
            self.policy.current,
            ExecRequest(command="true"),
            self.tenant,
            **self.resolve_args(Caller(self.tenant, self.session_id, self.workspace_name)),
        )
        self.prepare_workspace(resolved)
        return resolved

    def warm_pool(self) -> None:
        """(Re)target the warm pool at the current policy's default request
        (and its image as the store has it now)."""
        if self.config.pool_size <= 0:
            return
        digest = None
        try:
            ws = self.policy.current.tenant(self.tenant).workspace
            if self.session_from_request and ws.enabled and ws.scope == "session":
                # Each HTTP session mounts its own directory: no shape to boot ahead.
                raise ValueError("per-session workspaces differ for every HTTP session")
            resolved = self.pool_template()
            template, digest = resolved.options, resolved.receipt.image_digest
        except Exception as e:  # a policy whose default cannot be pooled: cold only
            log.warning("pool_disabled", reason=str(e))
            template = None
        if self.warmed is not None and self.warmed != template:
            self.manager.warm(self.warmed, 0)
        holding, self.pool_holding = self.pool_holding, None
        self.warmed, self.pool_digest = template, digest
        if template is not None:
            if digest is not None and self.images is not None:
                # While the pool targets a store image, `image rm` refuses it.
                self.pool_holding = self.images.hold(
                    digest, f"the warm pool of server pid {os.getpid()} (tenant {self.tenant})"
                )
            try:
                self.manager.warm(template, self.config.pool_size)
            except Exception as e:  # e.g. options the pool cannot serve: cold runs only
                log.warning("pool_disabled", reason=str(e))
                self.warmed = self.pool_digest = None
                if self.pool_holding is not None:
                    self.pool_holding.release()
                    self.pool_holding = None
        if holding is not None:
            holding.release()

    def hold_image(self, resolved: Resolved, result_id: str) -> Holding | None:
        """Mark the run's store image as in use until the run ends (`image rm`
        refuses it). A run of the default image that finds it rebuilt (its
        name now points at a new digest) moves the warm pool to the new one."""
        digest = resolved.receipt.image_digest
        if digest is None or self.images is None:
            return None
        image = resolved.receipt.get("image")
        if self.warmed is not None and digest != self.pool_digest and image.granted == resolved.settings.defaults.image:
            self.warm_pool()
        try:
            return self.images.hold(digest, f"run {result_id} (tenant {self.tenant}) of server pid {os.getpid()}")
        except ImageError as e:  # removed from the store since resolve() found it
            raise ImageUnavailable(str(e)) from e


@dataclass
class Runtime:
    """What all callers of one server process share: one Manager (one global
    capacity), one result store, one audit log, one set of jobs, metrics."""

    config: ServeConfig
    policy: PolicyHolder
    manager: ManagerAPI | JobRunner
    store: ResultStore
    audit: AuditLog
    jobs: Jobs
    metrics: Metrics
    after_close: list[Callable[[], None]] = field(default_factory=list)
    """Called once the Manager is closed (no sandbox uses a workspace any more)."""
    remote_workspaces: Any = None
    """`--backend ray`: file operations and session workspaces on the agents."""

    def app_for(self, tenant: str, *, session_from_request: bool = False) -> TenantState:
        app = TenantState(
            config=self.config,
            manager=self.manager,
            store=self.store,
            jobs=self.jobs,
            audit=self.audit,
            policy=self.policy,
            tenant=tenant,
            session_id=secrets.token_hex(16),
            workspace_root=self.config.workspace_root,
            session_from_request=session_from_request,
            metrics=self.metrics,
            images=self.policy.images,
            remote_workspaces=self.remote_workspaces,
        )
        self.after_close.append(lambda: _drop_session_workspaces(app))
        self.after_close.append(lambda: app.pool_holding.release() if app.pool_holding else None)
        return app


@asynccontextmanager
async def start_runtime(config: ServeConfig, policy: PolicyHolder) -> AsyncIterator[Runtime]:
    """Start the shared parts; on exit kill every running command, record it, clean up."""
    state_dir = config.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = _result_store(config)
    audit = AuditLog(state_dir / "audit.jsonl", max_bytes=config.audit_max_bytes, keep=config.audit_keep)
    rt: Runtime | None = None
    try:
        async with _where_jobs_run(config, policy, store) as manager, anyio.create_task_group() as tg:
            reaped = await manager.cleanup_stale()
            if config.backend == "local":
                _workspace.cleanup_stale(state_dir / "workspaces")  # mounts of dead servers
            recovered = store.recover()
            log.info(
                "server_start",
                tenant=config.tenant,
                state_dir=str(state_dir),
                reaped=reaped,
                recovered=recovered,
                policy_hash=policy.current.sha256,
                pool_size=config.pool_size,
            )
            metrics = Metrics()
            metrics.watch(manager.active_containers, manager.idle_pooled, manager.frozen_pooled)
            jobs = Jobs(manager, store, audit, tg, metrics, shared=config.multi_tenant)
            rt = Runtime(config, policy, manager, store, audit, jobs, metrics)
            if config.backend == "ray":
                # Lazy: ray is an optional extra, and only `serve --backend ray` needs it.
                from .cluster.remote_files import RemoteWorkspaces

                rt.remote_workspaces = RemoteWorkspaces(manager)
            try:
                yield rt
            finally:
                with anyio.CancelScope(shield=True):
                    await manager.close()
                    with anyio.move_on_after(5):
                        while rt.jobs.active_all():
                            await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for callback in rt.after_close if rt is not None else ():
                try:
                    callback()
                except Exception:
                    log.exception("after_close_failed")
            store.close()
            audit.close()
            log.info("server_stop", tenant=config.tenant)


def _result_store(config: ServeConfig) -> ResultStore:
    if config.backend == "ray":
        # Lazy: ray is an optional extra, and only `serve --backend ray` needs it.
        from .cluster.frontend import ClusterResultStore

        return ClusterResultStore(config.state_dir)
    return ResultStore(config.state_dir)


@asynccontextmanager
async def _where_jobs_run(
    config: ServeConfig, policy: PolicyHolder, store: ResultStore
) -> AsyncIterator[ManagerAPI | JobRunner]:
    """This host's Manager (with the egress side of network=sandbox), or for
    `--backend ray` the cluster's RayRunner: nothing runs on this host then,
    so no network service and no workspaces here (each agent has its own)."""
    if config.backend == "local":
        async with start_network(config.network) as net, Manager(config.manager, network=net) as manager:
            yield manager
        return
    # Lazy: ray is an optional extra, and only `serve --backend ray` needs it.
    from .cluster.frontend import ClusterResultStore, RayRunner

    runner = RayRunner(
        policy,
        config.workspace_root,
        config.state_dir / "cluster",
        expected_runsc_version=config.expect_runsc_version,
        kill_grace=config.manager.kill_grace,
    )
    if isinstance(store, ClusterResultStore):
        store.runner = runner
    async with runner:
        yield runner


@asynccontextmanager
async def start_network(config: NetworkConfig) -> AsyncIterator[NetworkService | None]:
    """The egress side of network=sandbox. A host where it cannot start
    (no netlink, no pyroute2) still serves: sandbox-mode calls are then
    refused with a clear error, never run with another network."""
    async with AsyncExitStack() as stack:
        try:
            service: NetworkService | None = await stack.enter_async_context(NetworkService(config))
        except Exception as e:
            log.warning("network_unavailable", error=str(e))
            service = None
        yield service


def _drop_session_workspaces(app: TenantState) -> None:
    """At server stop, every session ends: stdio's one, and HTTP sessions still open.

    Session workspaces are unmounted and deleted; tenant workspaces are
    unmounted (unless a neighbour server still uses them) and kept.
    """
    root = app.workspace_root.resolve()
    remote = app.remote_workspaces
    for path in list(app.made_workspaces):
        parts = path.relative_to(root).parts
        session = len(parts) == 3 and parts[1] == SESSIONS_DIR  # <tenant>/sessions/<session>
        if remote is not None:
            if session:  # on the agent holding it; a tenant's stays (other front ends use it)
                remote.remove(app.tenant, path)
        else:
            _workspace.release(path, remove=session)
        if session:
            app.made_workspaces.discard(path)
    if remote is not None:
        remote.flush()  # before the driver leaves the cluster
    _workspace.release_all()  # anything this process still holds
