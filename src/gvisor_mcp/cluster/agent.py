"""HostAgent: one per host, the only thing on a host that runs sandboxes for the cluster.

It wraps the same pieces as the single-host server — a `Manager` with its
own runsc root, bundle directory and cgroup parent, loop-mounted workspace
images, and a `ResultStore` in its own state directory for the output —
and adds what a host needs when the caller is on another machine:

- every spec is checked again against this host's `HostCeilings`
  (spec.to_options): the front end's policy is not trusted here;
- output stays here: while a run goes on and after it ends, its captured
  streams are files in this agent's store, read in pages (`read`); a run's
  answer carries counts and status, never the stream bytes;
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
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from .. import workspace as _workspace
from ..results import ResultStore
from ..sandbox import (
    ContainerStatus,
    InvalidOptionsError,
    Manager,
    ManagerConfig,
)
from ..sandbox.doctor import canary
from ..sandbox.runsc import RUNSC_ENV
from . import AGENT_NAME_PREFIX, HOST_RESOURCE_PREFIX, NAMESPACE
from .spec import HOST_RE, HostCeilings, RunSpec, SpecRefused, WorkspaceRef, default_ceilings, parse_spec, to_options

log = structlog.get_logger("gvisor_mcp.cluster.agent")

MAX_PAGE = 256 * 1024
"""Bytes per read(): a 256 KiB page crosses Ray in ~20 ms here (docs/scale-out.md)."""
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

    @property
    def workspace_root(self) -> Path:
        return self.state_dir / "workspaces"


def runsc_version(runsc_path: str) -> str:
    """runsc's first `--version` line ("runsc version 0.0~20240729.0"), or why not."""
    try:
        out = subprocess.run([runsc_path, "--version"], capture_output=True, text=True,
                             env=RUNSC_ENV, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (out.stdout.splitlines() or ["unavailable: no output"])[0].strip()


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

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Reap a predecessor's leftovers, run the canary; the health report."""
        if self._ready is None:
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
            async with Manager(cfg.manager) as manager:
                reaped = await manager.reap_stale()
                mounts = _workspace.cleanup_stale(cfg.workspace_root)
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
            **self._report,
        }

    async def run(self, spec: Any) -> dict[str, Any]:
        """Run one spec; the outcome without stream bytes (read them with `read`).

        SpecRefused for a spec this host will not run (nothing created, no
        row stored); SandboxError/RunscError for an infrastructure failure.
        """
        manager, store = self._require()
        rs = parse_spec(spec)
        options = to_options(rs, self.config.ceilings, manager.config.default_resources,
                             self.config.workspace_root)
        if rs.workspace is not None:
            self._ensure_workspace(rs.workspace, rs)
        try:
            res = manager.prepare(options)
        except InvalidOptionsError as e:
            raise SpecRefused(f"run spec refused: {e}") from None
        try:
            store.start(rs.result_id, tenant=rs.tenant, session=rs.workspace.session if rs.workspace else None,
                        command=_command_text(rs), container_id=None, limits=None)
        except sqlite3.IntegrityError:
            raise SpecRefused(
                f"run spec refused: {rs.result_id} was already run on this host (runs are at most once)"
            ) from None
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
            store.finish(rs.result_id, status=status,
                         stdout=result.stdout if result else b"", stderr=result.stderr if result else b"",
                         fields=fields)
        answer = result.model_dump(mode="json", exclude={"stdout", "stderr"})
        answer["host"] = self.config.host
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
        return [{"run_id": r.run_id, "container_id": r.container_id, "started_at": r.started_at}
                for r in manager.active_runs()]

    async def warm(self, template: Any, size: int) -> bool:
        """Keep `size` sandboxes booted for specs shaped like `template` (its
        result id is ignored). False when the shape cannot be pooled."""
        manager, _ = self._require()
        data = template.model_dump() if isinstance(template, RunSpec) else dict(template)
        rs = parse_spec({**data, "result_id": TEMPLATE_ID})
        options = to_options(rs, self.config.ceilings, manager.config.default_resources,
                             self.config.workspace_root)
        if rs.workspace is not None:
            self._ensure_workspace(rs.workspace, rs)
        try:
            manager.warm(options, min(size, self.config.pool_size) if self.config.pool_size else size)
        except InvalidOptionsError:
            return False
        return True

    async def release_workspace(self, ref: Any) -> None:
        """A session ended: its workspace image goes (a tenant's is only unmounted)."""
        ws = WorkspaceRef.model_validate(ref)
        path = ws.host_path(self.config.workspace_root).resolve()
        _workspace.release(path, remove=ws.scope == "session")

    async def ping(self) -> str:
        return self.config.host

    # --- inside ---------------------------------------------------------------------

    def _require(self) -> tuple[Manager, ResultStore]:
        if self.manager is None or self.store is None or self.manager.closed:
            raise SpecRefused(f"agent {self.config.host} is not running (start() first, or it is stopping)")
        return self.manager, self.store

    def _ensure_workspace(self, ws: WorkspaceRef, rs: RunSpec) -> None:
        root = self.config.workspace_root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        uid, gid = (rs.user.uid, rs.user.gid) if rs.user else (0, 0)
        try:
            _workspace.ensure(root, ws.host_path(root), ws.size_mb, uid, gid, ws.scope)
        except _workspace.WorkspaceError as e:
            raise SpecRefused(f"the workspace could not be prepared on {self.config.host}: {e}") from None


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

    cls = ray.remote(HostAgent)
    handle = cls.options(**actor_options(config.host)).remote(config)
    report = ray.get(handle.start.remote(), timeout=timeout)
    return handle, report
