"""HostAgent: one per host, the only thing on a host that runs sandboxes for the cluster.

It wraps the same pieces as the single-host server — a `Manager` with its
own runsc root, bundle directory and cgroup parent, loop-mounted workspace
images, and a `ResultStore` in its own state directory for the output —
and adds what a host needs when the caller is on another machine:

- every spec is checked again against this host's `HostCeilings`
  (spec.to_options): the front end's policy is not trusted here;
- output stays here: while a run goes on and after it ends, its captured
  streams are files in this agent's store, read in pages (`read`); a run's
  answer carries counts and status, and the streams themselves only when
  both are small (INLINE_MAX), so showing a small result costs no page;
- a result id runs at most once on this host: its row is inserted before the
  sandbox is created, and the primary key refuses a second insert;
- on start it reaps what a crashed predecessor left (containers, runsc state,
  cgroups, bundles, workspace mounts; result rows marked as lost), runs the
  canary and reports runsc's version, so a front end can refuse a host whose
  sandbox does not work or whose runsc differs.

The class itself knows nothing of Ray (tests and the CLI can use it
directly); `actor_options` and `start_agent` make it a Ray actor pinned to
its node by the custom resource `gvisor_mcp_host_<name>`, with retries off:
Ray never re-runs a call on an agent (at most once).

Why over ~400 lines: a host's reaping of its predecessor, its re-check of
every spec and its at-most-once run bookkeeping are one contract with the
front end; split, the at-most-once argument would span files.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from .. import workspace as _workspace
from ..images.store import ImageStore
from ..network import NetworkConfig, NetworkService
from ..network.fence import NO_FENCE, Fence
from ..results import ResultStore, StoreUnavailable
from ..sandbox import (
    ContainerStatus,
    InvalidOptionsError,
    Manager,
    ManagerConfig,
    NetworkMode,
    UserSpec,
)
from ..sandbox.doctor import canary
from ..sandbox.runsc import version_line
from . import AGENT_NAME_PREFIX, HOST_RESOURCE_PREFIX, NAMESPACE, agent_files
from .priority import normal_priority
from .spec import HOST_RE, HostCeilings, RunSpec, SpecRefused, WorkspaceRef, default_ceilings, parse_spec, to_options

log = structlog.get_logger("gvisor_mcp.cluster.agent")

LEFTOVER_WAIT = 60.0
"""Seconds a starting agent waits for its predecessor's workspace loop devices to detach."""
FENCE_REFRESH = 10.0
"""Seconds between re-reads of the cluster's nodes for the egress fence."""
RAY_PORTS = frozenset({6379, 8265, 10001, 52365})
"""Ray's default GCS, dashboard, client server and dashboard agent ports: fenced
on every address, with the ports the cluster's nodes report (cluster_fence)."""
MAX_PAGE = 256 * 1024
"""Bytes per read(): a 256 KiB page crosses Ray in ~20 ms here (docs/scale-out.md)."""
INLINE_MAX = 16 * 1024
"""A run whose two streams together are at most this many bytes sends them
with its answer: showing a result (every execute_command does) then needs no
round trip back to this host. Larger output is paged with read()."""
TEMPLATE_ID = "res_" + "0" * 32


class AgentConfig(BaseModel):
    """One host's agent. Paths are on that host and belong to this agent only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(pattern=HOST_RE.pattern)
    state_dir: Path
    """Output of runs (results.db + stream files) and workspaces/."""
    manager: ManagerConfig
    ceilings: HostCeilings = Field(default_factory=default_ceilings)
    pool_size: int = Field(default=0, ge=0, le=64)
    network: NetworkConfig = NetworkConfig()
    """network=sandbox (when the ceilings allow it): this host's egress proxy settings."""
    images_dir: Path | None = None
    """This host's image store (for `store:` catalog entries); default state_dir/images."""

    @property
    def workspace_root(self) -> Path:
        return self.state_dir / "workspaces"


def runsc_version(runsc_path: str) -> str:
    """runsc's first `--version` line, or why not (sandbox/runsc.py runs it)."""
    return version_line(runsc_path)


class HostAgent:
    """The host side of the cluster. Call `start()` once, `stop()` at the end."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.manager: Manager | None = None
        self.store: ResultStore | None = None
        self._ready: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None
        self._holder: asyncio.Task | None = None
        self._report: dict[str, Any] = {}
        self._runs = 0
        self._net: NetworkService | None = None
        self._fenced_at = 0.0
        self.images: ImageStore | None = None
        self._nice: int | None = None

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Reap a predecessor's leftovers, run the canary; the health report."""
        if self._ready is None:
            self._nice = normal_priority("agent")  # before the first runsc: sandboxes inherit it
            self._ready = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._holder = asyncio.create_task(self._hold())
        await asyncio.shield(self._ready)
        return await self.health()

    async def _hold(self) -> None:
        """Owns the Manager's task group for the agent's lifetime (one task
        must enter and exit it)."""
        assert self._ready is not None and self._stop is not None
        cfg = self.config
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            async with AsyncExitStack() as stack:
                net = None
                if NetworkMode.SANDBOX.value in cfg.ceilings.networks:
                    net = await stack.enter_async_context(NetworkService(cfg.network))
                    net.fence = await anyio.to_thread.run_sync(cluster_fence)
                    self._net = net
                manager = await stack.enter_async_context(Manager(cfg.manager, network=net))
                self.images = ImageStore(cfg.images_dir or cfg.state_dir / "images")
                reaped = await manager.reap_stale()
                mounts = _workspace.cleanup_stale(cfg.workspace_root)
                if reaped or mounts:
                    await anyio.to_thread.run_sync(_wait_detached, cfg.workspace_root, LEFTOVER_WAIT)
                store = ResultStore(cfg.state_dir)
                lost = store.recover()
                ok, detail = await canary(manager)
                self.manager, self.store = manager, store
                self._report = {
                    "reaped_containers": len(reaped),
                    "reaped_cgroups": sum(r.get("cgroups", 0) for r in reaped),
                    "reaped_mounts": mounts,
                    "lost_results": lost,
                    "canary_ok": ok,
                    "canary": detail,
                    "runsc_version": runsc_version(cfg.manager.runsc_path),
                    "started_at": time.time(),
                }
                log.info("agent_start", host=cfg.host, **self._report)
                self._ready.set_result(None)
                try:
                    await self._stop.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        await manager.close()
                        _workspace.release_all()
                        store.close()
        except BaseException as e:
            if not self._ready.done():
                self._ready.set_exception(e)
            raise

    async def stop(self) -> None:
        """Kill running commands (their results say so), unmount, close."""
        if self._stop is None or self._holder is None:
            return
        self._stop.set()
        await self._holder

    # --- what a front end calls ------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        if self._net is not None and time.monotonic() - self._fenced_at > FENCE_REFRESH:
            self._fenced_at = time.monotonic()  # nodes join and leave: re-read them now and then
            try:
                self._net.fence = await anyio.to_thread.run_sync(cluster_fence)
            except Exception:
                pass  # logged; the previous fence stays
        m = self.manager
        capacity = m.config.max_concurrent_containers if m else 0
        in_use = m.active_containers() if m else 0
        return {
            "host": self.config.host,
            "ready": m is not None and not m.closed,
            "capacity": capacity,
            "in_use": in_use,
            "free": max(0, capacity - in_use),
            "runs": self._runs,
            "instance": m.instance if m else None,
            "ceilings": self.config.ceilings.model_dump(mode="json"),
            "fence": self._net.fence.model_dump(mode="json") if self._net is not None else None,
            "nice": self._nice,
            **self._report,
        }

    async def run(self, spec: Any) -> dict[str, Any]:
        """Run one spec; the outcome without stream bytes (read them with `read`).

        SpecRefused for a spec this host will not run (nothing created, no
        row stored); SandboxError/RunscError for an infrastructure failure.
        """
        manager, store = self._require()
        rs = parse_spec(spec)
        options = to_options(
            rs, self.config.ceilings, manager.config.default_resources, self.config.workspace_root, self.images
        )
        if rs.workspace is not None:
            await self._ensure_workspace(rs.workspace, rs.user)
        holding = hold_image(self.images, self.config.ceilings, rs, options.rootfs, self.config.host)
        try:
            res = manager.prepare(options)
        except InvalidOptionsError as e:
            if holding is not None:
                holding.release()
            raise SpecRefused(f"run spec refused: {e}") from None
        try:
            return await self._run_held(rs, options, res, manager, store)
        finally:
            if holding is not None:
                holding.release()

    async def _run_held(self, rs: RunSpec, options: Any, res: Any, manager: Manager, store: ResultStore) -> dict:
        """run(), once the run's store image is held (image prune/rm refuse it meanwhile)."""
        once = SpecRefused(f"run spec refused: {rs.result_id} was already run on this host (runs are at most once)")
        if store.exists(rs.result_id):
            raise once  # checked first: a failed insert would remove the first run's live output
        try:
            store.start(
                rs.result_id,
                tenant=rs.tenant,
                session=rs.workspace.session if rs.workspace else None,
                command=_command_text(rs),
                container_id=None,
                limits=None,
            )
        except StoreUnavailable as e:
            if isinstance(e.__cause__, sqlite3.IntegrityError):
                raise once from None
            raise SpecRefused(f"run spec refused: this host cannot record the run ({e}); nothing was started") from None
        self._runs += 1
        out_w = store.part_writer(rs.result_id, "stdout", res.max_output_bytes)
        err_w = store.part_writer(rs.result_id, "stderr", res.max_output_bytes)
        options = options.model_copy(update={"stdout_writer": out_w, "stderr_writer": err_w})
        result = None
        status, error = "error", None
        try:
            result = await manager.run(options, run_id=rs.result_id)
            status, error = result.status.value, result.error
        except BaseException as e:
            error = f"{type(e).__name__}: {e}" if not isinstance(e, asyncio.CancelledError) else "cancelled"
            status = "killed" if isinstance(e, asyncio.CancelledError) else "error"
            raise
        finally:
            out_w.close()
            err_w.close()
            fields: dict[str, Any] = {"error": error}
            if result is not None:
                fields.update(_result_fields(result))
            store.finish(
                rs.result_id,
                status=status,
                stdout=result.stdout if result else b"",
                stderr=result.stderr if result else b"",
                fields=fields,
            )
        answer = result.model_dump(mode="json", exclude={"stdout", "stderr"})
        answer["host"] = self.config.host
        answer["inline"] = _small_output(store, rs.result_id, rs.tenant)
        return answer

    async def read(self, result_id: str, tenant: str, stream: str, offset: int, length: int) -> dict[str, Any] | None:
        """Bytes [offset, offset+length) of a stream of a result of `tenant`; None when
        this host has no such result (or it is another tenant's)."""
        _, store = self._require()
        stored = store.get(result_id, tenant)
        if stored is None:
            return None
        data, total = store.read(stored, stream, max(0, offset), max(0, min(length, MAX_PAGE)))
        return {"data": data, "total": total, "status": stored.status}

    async def kill(self, result_id: str) -> bool:
        manager, _ = self._require()
        return await manager.kill(result_id, ContainerStatus.KILLED)

    async def active(self) -> list[dict[str, Any]]:
        manager, _ = self._require()
        return [
            {"run_id": r.run_id, "container_id": r.container_id, "started_at": r.started_at}
            for r in manager.active_runs()
        ]

    async def warm(self, template: Any, size: int) -> bool:
        """Keep `size` sandboxes booted for specs shaped like `template` (its
        result id is ignored). False when the shape cannot be pooled."""
        manager, _ = self._require()
        data = template.model_dump() if isinstance(template, RunSpec) else dict(template)
        rs = parse_spec({**data, "result_id": TEMPLATE_ID})
        options = to_options(
            rs, self.config.ceilings, manager.config.default_resources, self.config.workspace_root, self.images
        )
        if rs.workspace is not None:
            await self._ensure_workspace(rs.workspace, rs.user)
        try:
            manager.warm(options, min(size, self.config.pool_size) if self.config.pool_size else size)
        except InvalidOptionsError:
            return False
        return True

    async def release_workspace(self, ref: Any) -> None:
        """A session ended: its workspace image goes (a tenant's is only unmounted).
        The reference is checked like a run's: directory names beneath this
        host's workspace root, never a path."""
        ws = agent_files.checked_ref(ref, self.config.ceilings)
        path = agent_files.workspace_dir(ws, self.config.workspace_root)
        _workspace.release(path, remove=ws.scope == "session")

    async def files(self, request: Any) -> dict[str, Any]:
        """A file tool's operation on a workspace of this host (agent_files.py)."""
        return await agent_files.serve(self, request)

    async def has_workspace(self, ref: Any) -> bool:
        """Whether this host holds the workspace (a front end looking for its home)."""
        ws = agent_files.checked_ref(ref, self.config.ceilings)
        return agent_files.exists(ws, self.config.workspace_root)

    async def ping(self) -> str:
        return self.config.host

    # --- inside ---------------------------------------------------------------------

    def _require(self) -> tuple[Manager, ResultStore]:
        if self.manager is None or self.store is None or self.manager.closed:
            raise SpecRefused(f"agent {self.config.host} is not running (start() first, or it is stopping)")
        return self.manager, self.store

    async def _ensure_workspace(self, ws: WorkspaceRef, user: UserSpec | None) -> None:
        """Mount the workspace; while a crashed predecessor's sandboxes still hold
        its image (their loop device outlives the reap until their last runsc
        process exits: slow on a loaded host), wait up to LEFTOVER_WAIT."""
        root = self.config.workspace_root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        uid, gid = (user.uid, user.gid) if user else (0, 0)
        deadline = time.monotonic() + LEFTOVER_WAIT
        while True:
            try:
                _workspace.ensure(root, ws.host_path(root), ws.size_mb, uid, gid, ws.scope)
                return
            except _workspace.WorkspaceError as e:
                # workspace.ensure's words for "a loop device we cannot see holds it"
                if "outside this server's mount namespace" in str(e) and time.monotonic() < deadline:
                    await anyio.sleep(1.0)
                    continue
                raise SpecRefused(f"the workspace could not be prepared on {self.config.host}: {e}") from None


def _wait_detached(root: Path, wait: float) -> None:
    """Wait for the loop devices of a crashed predecessor's workspace images.

    The agent runs in a Ray worker (threads): it cannot have a mount
    namespace of its own (mountns.py), so its mounts are the host's. Once the
    reaper has killed the orphaned sandboxes and cleanup_stale has unmounted
    their workspaces, the loop devices detach only when the last runsc
    process of those sandboxes has exited; until then workspace.ensure
    refuses to mount the image again (two mounts of one ext4 image corrupt
    it). Under load that takes longer than ensure's own short wait.
    """
    images = (root / _workspace.IMAGES_DIR).resolve()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        mounted = {backing for _, backing in _workspace.loop_mounts()}
        held = [b for _, b in _workspace.loop_devices() if images in b.parents and b not in mounted]
        if not held:
            return
        time.sleep(0.2)
    log.warning("agent_leftover_loop_devices", root=str(root), wait=wait)


def cluster_fence() -> Fence:
    """Every node of the Ray cluster (all ports) and Ray's ports (any address):
    what no sandbox of this agent may reach (network/fence.py). Nothing
    without Ray (an agent used directly, as in unit tests)."""
    try:
        import ray

        if not ray.is_initialized():
            return NO_FENCE
        nodes = ray.nodes()
        gcs = ray.get_runtime_context().gcs_address
    except Exception as e:  # keep the previous fence's caller going; say so
        log.warning("fence_read_failed", error=f"{type(e).__name__}: {e}")
        raise
    addresses: set[str] = set()
    ports = set(RAY_PORTS)
    for node in nodes:
        if node.get("NodeManagerAddress"):
            addresses.add(node["NodeManagerAddress"])
        ports.update(v for k, v in node.items() if k.endswith("Port") and isinstance(v, int) and v > 0)
    host, _, port = str(gcs).rpartition(":")
    if port.isdigit():
        ports.add(int(port))
        if host:
            addresses.add(host)
    networks = []
    for a in sorted(addresses):
        try:
            networks.append(ipaddress.ip_network(a))
        except ValueError:  # a name: resolve it here, once per refresh
            networks.extend(ipaddress.ip_network(info[4][0]) for info in socket.getaddrinfo(a, None))
    return Fence(networks=tuple(dict.fromkeys(networks)), ports=frozenset(ports))


def hold_image(images: ImageStore | None, ceilings: HostCeilings, rs: RunSpec, rootfs: str | None, host: str) -> Any:
    """Hold the run's store image until the run ends, as the single-host server
    does (runtime.hold_image): `gvisor-mcp image rm/prune` on this host refuse
    it meanwhile. None for the built-in image or a directory image. SpecRefused
    when the image left the store (or was re-tagged) since to_options found it."""
    entry = ceilings.images.get(rs.image, "")
    if images is None or not entry.startswith("store:"):
        return None
    from ..images.errors import ImageError

    try:
        stored = images.get(entry.removeprefix("store:"))
        if stored.rootfs != rootfs:
            raise ImageError(f"{rs.image!r} now names another image ({stored.digest})")
        return images.hold(stored.digest, f"run {rs.result_id} (tenant {rs.tenant}) of the agent on host {host}")
    except ImageError as e:
        raise SpecRefused(
            f"run spec refused: image={rs.image!r} changed in this host's store just now ({e}); retry"
        ) from None


def _small_output(store: ResultStore, result_id: str, tenant: str) -> dict[str, bytes] | None:
    """Both streams of a finished run, whole, when together they fit INLINE_MAX; else None."""
    stored = store.get(result_id, tenant)
    if stored is None:
        return None
    out, budget = {}, INLINE_MAX
    for stream in ("stdout", "stderr"):
        data, total = store.read(stored, stream, 0, budget + 1)
        if total > budget:
            return None
        out[stream], budget = data, budget - total
    return out


def _command_text(rs: RunSpec) -> str:
    if len(rs.command) == 3 and rs.command[1] == "-c":
        return rs.command[2]
    return " ".join(rs.command)


def _result_fields(result: Any) -> dict[str, Any]:
    return {
        "container_id": result.container_id,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "duration_ms": round(result.duration * 1000),
        "boot_ms": round(result.boot_duration * 1000),
        "oom_killed": result.oom_killed,
        "peak_memory_bytes": result.peak_memory_bytes,
        "stdout_bytes": result.stdout_bytes,
        "stderr_bytes": result.stderr_bytes,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "warm": result.warm,
    }


# --- as a Ray actor ----------------------------------------------------------------


def agent_name(host: str) -> str:
    return AGENT_NAME_PREFIX + host


def actor_options(host: str) -> dict[str, Any]:
    """How every agent actor is created. Constant: nothing here comes from a
    request (no runtime_env at all: agents run the code installed on their host)."""
    return {
        "name": agent_name(host),
        "namespace": NAMESPACE,
        "resources": {HOST_RESOURCE_PREFIX + host: 0.001},
        "num_cpus": 0,
        "max_restarts": 0,
        "max_task_retries": 0,
        "max_concurrency": 1000,
        "get_if_exists": False,
    }


def start_agent(config: AgentConfig, *, timeout: float = 300.0) -> tuple[Any, dict[str, Any]]:
    """Create the agent actor on `config.host`'s node and start it (needs
    `ray.init` done); (handle, health report)."""
    import ray
    from ray.exceptions import ActorAlreadyExistsError

    cls: Any = ray.remote(HostAgent)  # an actor class: its methods gain .remote, which mypy cannot see
    deadline = time.monotonic() + min(timeout, 60.0)
    while True:
        try:
            handle = cls.options(**actor_options(config.host)).remote(config)
            break
        except ActorAlreadyExistsError:
            # A lost node's agent keeps its name until the GCS has marked it
            # dead (seconds after the node); a live agent keeps it for good.
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    report: dict[str, Any] = ray.get(handle.start.remote(), timeout=timeout)
    return handle, report
