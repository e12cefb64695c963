"""The MCP server: lifespan owns the Manager, the result store and the policy.

stdio first: one process serves one client session for one tenant chosen at
start-up (identity is never a tool argument). Shutdown — stdin closed,
SIGTERM, SIGINT — kills running containers and records their results.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import logs, mountns
from . import workspace as _workspace
from .audit import DEFAULT_KEEP as DEFAULT_AUDIT_KEEP
from .audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from .audit import AuditLog
from .images.store import Holding, ImageStore
from .jobs import Jobs
from .lifecycle import Signals
from .metrics import Metrics
from .paths import default_state_dir
from .network import NetworkConfig, NetworkService
from .policy import ExecRequest, Policy, Resolved, load, load_default, path_component, resolve, workspace_host_path
from .policy.resolve import SESSIONS_DIR
from .roots import AgentWorkspaces, stdio_places
from .policy.fairness import capacity_warnings
from .results import ResultStore
from .sandbox import Manager, ManagerConfig
from .sandbox.doctor import canary
from .stdio import serve_stdio

log = structlog.get_logger("gvisor_mcp.server")

SERVER_NAME = "gvisor-mcp"
INSTRUCTIONS = (
    "Runs shell commands for you, each in a NEW, isolated gVisor sandbox. Nothing carries "
    "over between calls (no cd, no exported variables, no background processes, no "
    "installed packages) except files in the workspace directory, when the policy mounts "
    "one. Long output is cut to its head and tail; read the rest with inspect_result."
)


@dataclass
class Settings:
    tenant: str = "default"
    policy_path: str | None = None
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    """The Manager's configuration (runsc, roots, cgroup parent, capacity): cli._config."""
    pool_size: int = 2
    """Sandboxes kept booted for the tenant's default request shape (0: none)."""
    metrics_port: int = 0
    """stdio: also serve Prometheus /metrics on 127.0.0.1:PORT (0: no)."""
    workspace_name: str = "default"
    """stdio, scope session: the named workspace this process uses (kept across restarts)."""
    projects: dict[str, Any] = field(default_factory=dict)
    """Projects the operator gave on the command line (`serve --project DIR`), by name."""
    max_workspaces: int = 128
    """Workspace images this process keeps mounted at once, all tenants (one loop device each)."""
    max_workspaces_per_tenant: int = 16
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """network=sandbox: per-run namespaces and the egress proxy (cli --egress-host, --no-system-dns)."""
    multi_tenant: bool = False
    """HTTP: one process serves every tenant; admission keeps a slot for a
    tenant below its fair share (jobs.FairGate)."""
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    audit_keep: int = DEFAULT_AUDIT_KEEP
    """audit.jsonl is rotated past audit_max_bytes; audit_keep old files stay."""


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
        self.listeners: list[Any] = []
        """Called with no argument after a successful reload (e.g. to re-warm the pool)."""

    def reload(self) -> bool:
        if not self.path:
            return False
        try:
            self.current = load(self.path, images=self.images)
        except Exception as e:  # keep serving with the old policy
            log.error("policy_reload_failed", path=self.path, error=str(e))
            return False
        log.info("policy_reloaded", path=self.path, policy_hash=self.current.hash)
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
class AppState:
    settings: Settings
    manager: Manager
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
        """Unmount and delete a session workspace (its image goes with it)."""
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
        return Caller(self.tenant, self.session_id, self.settings.workspace_name)

    def resolve_args(self, caller: Caller) -> dict[str, Any]:
        """resolve()'s server-given arguments for `caller`."""
        return dict(
            workspace_root=self.workspace_root, session_id=caller.session_id,
            workspace_name=caller.workspace_name, extra_projects=self.settings.projects,
            images=self.images,
        )

    def expire_created(self) -> None:
        """Remove agent-created workspaces unused for too long (not while a command uses one)."""
        busy = {j.session for j in self.jobs.active_all() if j.tenant == self.tenant and j.session}
        for handle in self.created.idle(busy):
            self.created.forget(handle)
            self.remove_workspace(
                workspace_host_path(self.workspace_root, self.tenant, "session", handle).resolve()
            )

    def prepare_workspace(self, resolved: Resolved) -> None:
        """Mount the run's workspace, if the policy gives it one: a size-limited
        image of the plan's size, its root owned by the sandbox user (see
        workspace.py).

        Only paths under the server's own workspace root are ever created; the
        policy derives them from tenant and session, never from a request.
        """
        if resolved.workspace is not None:
            user = resolved.options.user
            self.prepare_plan(resolved.workspace, (user.uid, user.gid) if user else (0, 0))

    def prepare_plan(self, plan: Any, owner: tuple[int, int]) -> Path:
        """prepare_workspace for a WorkspacePlan (the file tools have no Resolved);
        returns the mounted directory."""
        from mcp.server.mcpserver.exceptions import ToolError

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
            raise ToolError(
                f"the workspace could not be prepared, so nothing was run: {reason}. "
                "Retry later; if it persists, the server's disk may be full (tell the operator)."
            ) from e
        self.made_workspaces.add(target)
        self._prepared[plan.host_path] = target
        return target

    def _check_workspace_caps(self, root: Path) -> None:
        """Refuse a new mount past --max-workspaces(-per-tenant): each is an
        image and a loop device, and HTTP sessions come and go at a client's will."""
        from mcp.server.mcpserver.exceptions import ToolError

        held = _workspace.held()
        tenant_dir = root / path_component(self.tenant)
        mine = sum(1 for p in held if tenant_dir in p.parents)
        s = self.settings
        if mine >= s.max_workspaces_per_tenant:
            raise ToolError(
                f"the workspace could not be prepared: tenant {self.tenant!r} already has {mine} workspaces "
                f"mounted, the most this server allows per tenant (--max-workspaces-per-tenant "
                f"{s.max_workspaces_per_tenant}); each open session holds one. End a session you no longer "
                "use (HTTP DELETE), or wait until idle ones expire, then call again"
            )
        if len(held) >= s.max_workspaces:
            raise ToolError(
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
            self.policy.current, ExecRequest(command="true"), self.tenant,
            **self.resolve_args(Caller(self.tenant, self.session_id, self.settings.workspace_name)),
        )
        self.prepare_workspace(resolved)
        return resolved

    def warm_pool(self) -> None:
        """(Re)target the warm pool at the current policy's default request
        (and its image as the store has it now)."""
        if self.settings.pool_size <= 0:
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
                self.manager.warm(template, self.settings.pool_size)
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
        if (self.warmed is not None and digest != self.pool_digest
                and image.granted == resolved.settings.defaults.image):
            self.warm_pool()
        return self.images.hold(digest, f"run {result_id} (tenant {self.tenant}) of server pid {os.getpid()}")


@dataclass
class Runtime:
    """What all callers of one server process share: one Manager (one global
    capacity), one result store, one audit log, one set of jobs, metrics."""

    settings: Settings
    policy: PolicyHolder
    manager: Manager
    store: ResultStore
    audit: AuditLog
    jobs: Jobs
    metrics: Metrics
    after_close: list[Any] = field(default_factory=list)
    """Called once the Manager is closed (no sandbox uses a workspace any more)."""

    def app_for(self, tenant: str, *, session_from_request: bool = False) -> AppState:
        app = AppState(
            settings=self.settings,
            manager=self.manager,
            store=self.store,
            jobs=self.jobs,
            audit=self.audit,
            policy=self.policy,
            tenant=tenant,
            session_id=secrets.token_hex(16),
            workspace_root=self.settings.state_dir / "workspaces",
            session_from_request=session_from_request,
            metrics=self.metrics,
            images=self.policy.images,
        )
        self.after_close.append(lambda: _drop_session_workspaces(app))
        self.after_close.append(lambda: app.pool_holding.release() if app.pool_holding else None)
        return app


@asynccontextmanager
async def runtime(settings: Settings, policy: PolicyHolder) -> AsyncIterator[Runtime]:
    """Start the shared parts; on exit kill every running command, record it, clean up."""
    state_dir = settings.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ResultStore(state_dir)
    audit = AuditLog(state_dir / "audit.jsonl", max_bytes=settings.audit_max_bytes, keep=settings.audit_keep)
    rt: Runtime | None = None
    try:
        async with start_network(settings.network) as net, \
                Manager(settings.manager, network=net) as manager, anyio.create_task_group() as tg:
            reaped = await manager.cleanup_stale()
            _workspace.cleanup_stale(state_dir / "workspaces")  # mounts of dead servers
            recovered = store.recover()
            log.info("server_start", tenant=settings.tenant, state_dir=str(state_dir),
                     reaped=reaped, recovered=recovered, policy_hash=policy.current.hash,
                     pool_size=settings.pool_size)
            metrics = Metrics()
            metrics.watch(manager.active_containers, manager.idle_pooled)
            jobs = Jobs(manager, store, audit, tg, metrics, shared=settings.multi_tenant)
            rt = Runtime(settings, policy, manager, store, audit, jobs, metrics)
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
            log.info("server_stop", tenant=settings.tenant)


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


def build_server(  # type: ignore[no-untyped-def]
    settings: Settings, policy: PolicyHolder, tenant: str | None = None, lifespan: Any = None, *,
    over_http: bool = False,
):
    """An MCPServer whose tools publish `tenant`'s policy in their schemas.

    stdio: the lifespan starts the Runtime and serves one tenant. HTTP passes
    its own lifespan (one Runtime shared by every tenant's server) and
    `over_http`: under scope session, agents may then create workspaces
    (roots.py: protocol 2026-07-28 has no sessions).
    """
    from .tools import register_tools
    from .tools.files import file_facts
    from .tools.boundary import SafeServer
    from .tools.view import schema_facts

    tenant = tenant or settings.tenant

    @asynccontextmanager
    async def stdio_lifespan(_server: Any) -> AsyncIterator[AppState]:
        async with runtime(settings, policy) as rt, anyio.create_task_group() as side:
            if settings.metrics_port:
                from .http import serve_metrics

                side.start_soon(serve_metrics, rt.metrics, settings.metrics_port)
            app = rt.app_for(tenant)
            app.warm_pool()
            policy.listeners.append(app.warm_pool)
            try:
                yield app
            finally:
                policy.listeners.remove(app.warm_pool)
                side.cancel_scope.cancel()

    server = SafeServer(
        name=SERVER_NAME,
        instructions=INSTRUCTIONS,
        lifespan=lifespan or stdio_lifespan,
        log_level="WARNING",
    )
    effective = policy.current.tenant(tenant)
    ws = effective.workspace
    agent_workspaces = over_http and ws.enabled and ws.scope == "session"
    register_tools(server, schema_facts(effective), file_facts(effective, settings.projects, agent_workspaces))
    return server


def _drop_session_workspaces(app: AppState) -> None:
    """At server stop, every session ends: stdio's one, and HTTP sessions still open.

    Session workspaces are unmounted and deleted; tenant workspaces are
    unmounted (unless a neighbour server still uses them) and kept.
    """
    root = app.workspace_root.resolve()
    for path in list(app.made_workspaces):
        parts = path.relative_to(root).parts
        session = len(parts) == 3 and parts[1] == SESSIONS_DIR  # <tenant>/sessions/<session>
        _workspace.release(path, remove=session)
        if session:
            app.made_workspaces.discard(path)
    _workspace.release_all()  # anything this process still holds


async def _serve_stdio(settings: Settings, policy: PolicyHolder, signals: Signals) -> None:
    server = build_server(settings, policy)
    # serve_stdio returns when stdin ends; a stop signal cancels it. Either
    # way the lifespan (runtime()) cleans up, shielded, before this returns.
    await signals.guard(lambda: serve_stdio(server), on_reload=policy.reload)


def network_config(args: Any) -> NetworkConfig:
    """--egress-host NAME=ADDR (repeatable) and --no-system-dns."""
    hosts: dict[str, list[str]] = {}
    for item in getattr(args, "egress_host", None) or []:
        name, sep, addr = item.partition("=")
        if not sep:
            raise ValueError(f"--egress-host {item!r}: expected NAME=ADDRESS, like mirror.internal=10.0.0.5")
        hosts.setdefault(name.strip(), []).append(addr.strip())
    return NetworkConfig(hosts=hosts, system_dns=not getattr(args, "no_system_dns", False))


def serve(args: Any) -> int:
    """`gvisor-mcp serve`: refuse to start unless a sandbox really works."""
    try:
        return _serve(args)
    finally:
        Signals.finished()


def _return_big_buffers_to_the_os() -> None:
    """glibc: every allocation of 1 MiB or more is its own mapping, unmapped when freed.

    By default glibc raises that threshold after the first large free (up to
    32 MiB), and from then on big transient buffers — a 30 MB request line,
    its parsed text — come from the heap and stay resident after they are
    freed: +86 MiB after one 30 MB line (issue 14, finding 10).
    """
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def _serve(args: Any) -> int:
    from .cli import manager_config

    # First of all: from here on a signal never kills the process with
    # something to clean up (lifecycle.py), and workspace mounts live in a
    # namespace the kernel tears down with us (mountns.py; needs a process
    # with no threads yet).
    signals = Signals()
    signals.install()
    _return_big_buffers_to_the_os()
    logs.configure(os.environ.get("GVISOR_MCP_LOG_LEVEL", "INFO"))
    log.info("serve_begin", pid=os.getpid())
    try:
        network = network_config(args)
    except ValueError as e:
        print(f"gvisor-mcp: {e}", file=sys.stderr)
        return 2
    settings = Settings(
        tenant=args.tenant or "default",
        policy_path=args.policy,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        manager=manager_config(args),
        pool_size=args.pool_size,
        metrics_port=getattr(args, "metrics_port", 0),
        max_workspaces=args.max_workspaces,
        max_workspaces_per_tenant=args.max_workspaces_per_tenant,
        network=network,
        multi_tenant=getattr(args, "transport", "stdio") == "http",
        audit_max_bytes=int(getattr(args, "audit_max_mb", DEFAULT_AUDIT_MAX_BYTES >> 20)) << 20,
        audit_keep=getattr(args, "audit_keep", DEFAULT_AUDIT_KEEP),
    )
    try:
        if settings.audit_max_bytes < 1 << 20 or settings.audit_keep < 0:
            raise ValueError("--audit-max-mb must be at least 1 and --audit-keep at least 0")
        policy = PolicyHolder(settings.policy_path, ImageStore(settings.state_dir / "images"))
        policy.current.tenant(settings.tenant)
        for warning in policy.current.warnings:
            log.warning("policy_warning", warning=str(warning))
        _workspace.check_support(policy.current)  # never an unbounded workspace
        settings.workspace_name, settings.projects = stdio_places(args, policy.current.tenant(settings.tenant))
    except Exception as e:
        print(f"gvisor-mcp: {e}", file=sys.stderr)
        return 2
    for warning in capacity_warnings(
        policy.current, settings.manager.max_concurrent_containers,
        None if settings.multi_tenant else [settings.tenant], shared=settings.multi_tenant,
    ):
        log.warning("capacity_warning", warning=warning)

    options = None
    if getattr(args, "transport", "stdio") == "http":
        from .http import HttpOptions

        options = HttpOptions(
            host=args.host,
            port=args.port,
            tokens_path=args.tokens or str(settings.state_dir / "tokens.yaml"),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            behind_tls_proxy=args.behind_tls_proxy,
            allowed_hosts=tuple(args.allowed_host),
            allowed_origins=tuple(args.allowed_origin),
            max_body_bytes=args.max_body_bytes,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
            session_idle_timeout=args.session_idle_timeout,
            max_sessions=args.max_sessions,
            max_sessions_per_tenant=args.max_sessions_per_tenant,
        )
        try:
            options.check()
        except ValueError as e:
            print(f"gvisor-mcp: {e}", file=sys.stderr)
            return 2

    namespace = mountns.enter((settings.state_dir / "workspaces").resolve())
    log.info("mount_namespace", namespace=namespace)

    async def preflight() -> tuple[bool, str] | None:
        async with Manager(settings.manager) as manager:
            # A stop signal cancels only the canary; the Manager's exit then
            # removes its sandbox as usual.
            return await signals.guard(lambda: canary(manager))

    try:
        checked = anyio.run(preflight)
    except Exception as e:
        checked = False, f"{type(e).__name__}: {e}"
    if checked is None:  # stopped by a signal during the canary
        log.info("server_stop", tenant=settings.tenant, before="serving")
        return 0
    ok, detail = checked
    if not ok:
        print(
            "gvisor-mcp: refusing to serve: a sandbox could not run the canary "
            f"(`ls -l /` inside gVisor): {detail}. Run `gvisor-mcp doctor`; "
            "commands are never run outside gVisor.",
            file=sys.stderr,
        )
        return 1
    if options is not None:
        from .http import serve_http
        from .tools import boundary  # noqa: F401  (the MCP server modules: ~1 s of imports, paid
        # here and not by the first request of each tenant, which builds its server lazily)

        anyio.run(serve_http, settings, policy, options, signals)
        return 0
    anyio.run(_serve_stdio, settings, policy, signals)
    return 0
