"""How a run works: one fresh gVisor sandbox per call, created and destroyed
inside `Manager.run`.

Per run: a fresh container id; a bundle directory (config.json, an empty
per-run root for the default image); a cgroup leaf we create and fill with
limits; a foreground `runsc run`; output pumped into bounded captures; a
watchdog for the deadline; then counters read from the cgroup and everything
removed: runsc state, cgroup, bundle.

Ownership: every Manager holds an exclusive flock on its own owner file for
its lifetime. Container ids embed the Manager's instance id, so
`cleanup_stale` can tell a live neighbour's runs (lock held: never touched)
from a dead process's leftovers (lock free: reaped).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .cgroups import Cgroup, detect_version, list_leaves
from .ownership import OwnerLock
from .options import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_PIDS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    ContainerOptions,
    InvalidOptionsError,
    NetworkMode,
    ResourceSpec,
)
from .output import BoundedCapture
from .result import ContainerResult, ContainerStatus
from .rootfs import host_system_entries, make_root, write_etc
from .runsc import BootWatch, Runsc, RunscError
from .spec import build_spec, check_workdir

log = structlog.get_logger("gvisor_mcp.sandbox")

ID_PREFIX = "gm-"


class ManagerClosedError(RuntimeError):
    """run() after close()."""

    def __init__(self) -> None:
        super().__init__("gvisor manager is closed")


class SandboxError(RuntimeError):
    """An infrastructure failure before the command could run (runsc, cgroups, disk)."""


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


@dataclass
class ActiveRun:
    """A run in flight, as list_active() shows it."""

    container_id: str
    command: tuple[str, ...]
    started_at: float  # wall clock
    started_mono: float
    resources: ResourceSpec
    reason: ContainerStatus | None = None
    process: anyio.abc.Process | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    cancel_scope: anyio.CancelScope | None = None


class Manager:
    """Runs commands, each in a fresh gVisor sandbox. Safe for concurrent use."""

    def __init__(self, config: ManagerConfig | None = None) -> None:
        self.config = config or ManagerConfig()
        self.runsc = Runsc(self.config.runsc_path, self.config.runsc_root, self.config.platform)
        version = detect_version()
        if version is None:
            raise SandboxError(
                "no cgroup memory controller found under /sys/fs/cgroup: limits "
                "cannot be enforced, refusing to run"
            )
        self.cgroup_version = version
        self._base = Path(self.config.bundle_base_dir)
        self._base.mkdir(parents=True, exist_ok=True, mode=0o700)
        Path(self.config.runsc_root).mkdir(parents=True, exist_ok=True, mode=0o700)
        self._etc = write_etc(self._base / ".image" / "etc")
        self._system = host_system_entries()
        self._owner = OwnerLock(self._base / ".owners")
        self.instance = self._owner.instance
        self._limiter = anyio.CapacityLimiter(self.config.max_concurrent_containers)
        self._active: dict[str, ActiveRun] = {}
        self._closed = False
        self._close_done: anyio.Event | None = None

    # --- public API ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def active_containers(self) -> int:
        """The number of containers currently running."""
        return len(self._active)

    def active_runs(self) -> list[ActiveRun]:
        return list(self._active.values())

    def new_container_id(self) -> str:
        """A fresh id embedding this Manager's instance (cleanup_stale relies on it)."""
        return f"{ID_PREFIX}{self.instance}-{secrets.token_hex(6)}"

    def prepare(self, options: ContainerOptions) -> ResourceSpec:
        """Validate everything that can be checked before a container exists.

        Raises InvalidOptionsError; returns the effective resources.
        """
        options.validate()
        check_workdir(options)
        if options.network is NetworkMode.SANDBOX:
            raise InvalidOptionsError(
                "network",
                options.network.value,
                "'none' or 'host' on this server: gVisor's own network stack "
                "('sandbox') needs a per-run network namespace that is not built yet",
            )
        return options.resources.merged_over(self.config.default_resources)

    async def run(
        self, options: ContainerOptions, *, container_id: str | None = None
    ) -> ContainerResult:
        """Run one command in a fresh sandbox and destroy it.

        A command that fails is a normal result; only infrastructure failures
        before the command ran raise (SandboxError, RunscError). Invalid
        options raise InvalidOptionsError before anything is created.
        Cancelling the awaiting task kills the container, removes everything,
        and re-raises the cancellation.
        """
        if self._closed:
            raise ManagerClosedError()
        res = self.prepare(options)
        cid = container_id or self.new_container_id()
        if not cid.startswith(f"{ID_PREFIX}{self.instance}-"):
            raise InvalidOptionsError("container_id", cid, "an id from new_container_id()")
        async with self._limiter:
            if self._closed:
                raise ManagerClosedError()
            run = ActiveRun(
                container_id=cid,
                command=options.command,
                started_at=time.time(),
                started_mono=time.monotonic(),
                resources=res,
            )
            self._active[cid] = run
            try:
                return await self._execute(run, options, res)
            finally:
                del self._active[cid]
                run.done.set()

    async def kill(self, container_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        """Kill a running container; its run() returns with `reason` as status."""
        run = self._active.get(container_id)
        if run is None:
            return False
        await self._terminate(run, reason)
        return True

    async def close(self) -> None:
        """Stop accepting runs, kill in-flight ones, wait close_grace, force-delete.

        Idempotent; concurrent callers all return once shutdown finished.
        """
        if self._closed:
            if self._close_done is not None:
                await self._close_done.wait()
            return
        self._closed = True
        self._close_done = anyio.Event()
        try:
            runs = list(self._active.values())
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for run in runs:
                        tg.start_soon(self._terminate, run, ContainerStatus.KILLED)
                with anyio.move_on_after(self.config.close_grace):
                    for run in runs:
                        await run.done.wait()
                for run in runs:
                    if not run.done.is_set():
                        await self._force_delete(run)
                        if run.cancel_scope is not None:
                            run.cancel_scope.cancel()
                with anyio.move_on_after(self.config.kill_grace):
                    for run in runs:
                        await run.done.wait()
        finally:
            self._owner.release()
            self._close_done.set()

    async def cleanup_stale(self) -> int:
        """Remove leftovers no live Manager owns; return how many containers."""
        return len(await self.reap_stale())

    async def reap_stale(self) -> list[dict]:
        """Like cleanup_stale, with a report of what was removed per container."""
        candidates: set[str] = set()
        try:
            candidates.update(await self.runsc.list_ids())
        except (RunscError, json.JSONDecodeError):
            pass
        candidates.update(self.runsc.ids_in_state_dir())
        candidates.update(self.runsc.all_run_ids(ID_PREFIX))
        candidates.update(
            p.name for p in self._base.iterdir() if p.name.startswith(ID_PREFIX)
        )
        candidates.update(
            n for n in list_leaves(self.config.cgroup_parent, self.cgroup_version)
            if n.startswith(ID_PREFIX)
        )
        report = []
        alive: dict[str, bool] = {}
        for cid in sorted(candidates):
            inst = _instance_of(cid)
            if inst is None:
                continue  # not ours: never touch it
            if inst == self.instance and cid in self._active:
                continue
            if inst != self.instance:
                if inst not in alive:
                    alive[inst] = self._owner.alive(inst)
                if alive[inst]:
                    continue
            report.append(await self._reap(cid))
        self._owner.forget_dead()
        if report:
            log.info("cleanup_stale", removed=len(report))
        return report

    # --- one run ------------------------------------------------------------

    async def _execute(
        self, run: ActiveRun, options: ContainerOptions, res: ResourceSpec
    ) -> ContainerResult:
        cid = run.container_id
        t0 = time.monotonic()
        bundle = self._base / cid
        cgroup = Cgroup(f"/{self.config.cgroup_parent}/{cid}", self.cgroup_version)
        out = BoundedCapture(res.max_output_bytes, options.stdout_writer)
        err = BoundedCapture(res.max_output_bytes, options.stderr_writer)
        watch: BootWatch | None = None
        proc: anyio.abc.Process | None = None
        try:
            try:
                bundle.mkdir(mode=0o700)
                root = None
                if options.rootfs is None:
                    root = bundle / "rootfs"
                    make_root(
                        root,
                        [m.destination for m in options.extra_mounts] + [options.workdir],
                        self._system,
                    )
                spec = build_spec(
                    options,
                    root_path=str(root) if root else None,
                    etc_dir=str(self._etc),
                    cgroups_path=cgroup.rel,
                    resources=res,
                )
                (bundle / "config.json").write_text(json.dumps(spec))
                cgroup.create(res)
                watch = BootWatch(self.runsc, cid)
                proc = await self.runsc.open_run(
                    cid,
                    str(bundle),
                    options.network,
                    str(bundle / "runsc.log"),
                    stdin=options.stdin is not None,
                )
            except OSError as e:
                raise SandboxError(f"could not prepare the sandbox: {e}") from e
            run.process = proc
            await self._supervise(run, proc, options, res, out, err, watch)
            duration = time.monotonic() - t0
            returncode = proc.returncode if proc.returncode is not None else -1
            stats = cgroup.stats()
            runsc_error = _runsc_error(bundle / "runsc.log")
            boot = (watch.running_at - t0) if watch.running_at else None
            if runsc_error and boot is None and run.reason is None:
                raise SandboxError(f"runsc failed before the command started: {runsc_error}")
            status, error = self._status(run, stats.oom_kills, runsc_error)
            signal = returncode - 128 if 128 < returncode <= 128 + 64 else None
            if returncode < 0:  # the runsc client itself died of a signal
                signal = -returncode
            result = ContainerResult(
                container_id=cid,
                exit_code=returncode,
                stdout=out.value(),
                stderr=err.value(),
                stdout_truncated=out.truncated,
                stderr_truncated=err.truncated,
                stdout_bytes=out.total,
                stderr_bytes=err.total,
                duration=duration,
                boot_duration=boot if boot is not None else duration,
                status=status,
                oom_killed=stats.oom_kills > 0,
                peak_memory_bytes=stats.peak_memory_bytes,
                signal=signal,
                error=error,
            )
            log.info("run", container_id=cid, **_log_fields(result))
            return result
        finally:
            with anyio.CancelScope(shield=True):
                if watch is not None:
                    watch.close()
                await self._teardown(cid, proc, cgroup, bundle)

    async def _supervise(
        self,
        run: ActiveRun,
        proc: anyio.abc.Process,
        options: ContainerOptions,
        res: ResourceSpec,
        out: BoundedCapture,
        err: BoundedCapture,
        watch: BootWatch,
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                run.cancel_scope = tg.cancel_scope
                if watch.available:
                    tg.start_soon(watch.wait)
                if res.timeout:
                    tg.start_soon(self._deadline, run, res.timeout)
                if options.stdin is not None and proc.stdin is not None:
                    tg.start_soon(_feed, proc.stdin, options.stdin)
                async with anyio.create_task_group() as io:
                    io.start_soon(_pump, proc.stdout, out)
                    io.start_soon(_pump, proc.stderr, err)
                await proc.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside (or a writer raised): the container must
            # not outlive this call.
            with anyio.CancelScope(shield=True):
                if run.reason is None:
                    run.reason = ContainerStatus.KILLED
                await self._terminate(run, run.reason)
                with anyio.move_on_after(self.config.kill_grace):
                    await proc.wait()
                if proc.returncode is None:
                    await self._force_delete(run)
            raise

    async def _deadline(self, run: ActiveRun, timeout: float) -> None:
        await anyio.sleep(timeout)
        await self._terminate(run, ContainerStatus.TIMED_OUT)

    async def _terminate(self, run: ActiveRun, reason: ContainerStatus) -> None:
        """Kill the container (first reason wins); force after kill_grace."""
        if run.reason is None:
            run.reason = reason
        proc = run.process
        deadline = time.monotonic() + self.config.kill_grace
        while proc is None or proc.returncode is None:
            if await self.runsc.kill(run.container_id):
                break
            if time.monotonic() > deadline:
                break
            # Not created yet (or mid-boot): try again shortly.
            await anyio.sleep(0.05)
            proc = run.process
        if proc is None or proc.returncode is not None:
            return
        with anyio.move_on_after(self.config.kill_grace):
            while proc.returncode is None:
                await anyio.sleep(0.05)
            return
        await self._force_delete(run)

    async def _force_delete(self, run: ActiveRun) -> None:
        await self.runsc.delete(run.container_id)
        proc = run.process
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    def _status(
        self, run: ActiveRun, oom_kills: int, runsc_error: str | None
    ) -> tuple[ContainerStatus, str | None]:
        if run.reason is not None:
            return run.reason, None
        if oom_kills > 0:
            return ContainerStatus.OOM_KILLED, None
        if runsc_error:
            return ContainerStatus.ERROR, f"runsc: {runsc_error}"
        return ContainerStatus.EXITED, None

    async def _teardown(
        self,
        cid: str,
        proc: anyio.abc.Process | None,
        cgroup: Cgroup,
        bundle: Path,
    ) -> None:
        """Remove runsc state, the cgroup and the bundle. Never raises."""
        try:
            if proc is not None:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
            if proc is None or self.runsc.has_state(cid):
                if self.runsc.has_state(cid):
                    await self.runsc.delete(cid)
                    self.runsc.remove_state_files(cid)
            left = await cgroup.remove()
            if left:
                for pid in self.runsc.process_pids(cid):
                    _kill_pid(pid)
                left = await cgroup.remove()
            if left:
                log.warning("cgroup_left", container_id=cid, paths=[str(p) for p in left])
            shutil.rmtree(bundle, ignore_errors=True)
        except Exception as e:  # teardown must not mask the result
            log.error("teardown_failed", container_id=cid, error=repr(e))

    async def _reap(self, cid: str) -> dict:
        removed: dict = {"container_id": cid}
        pids = self.runsc.process_pids(cid)
        had_state = self.runsc.has_state(cid)
        if had_state:
            await self.runsc.kill(cid)
            await self.runsc.delete(cid)
            self.runsc.remove_state_files(cid)
        for pid in self.runsc.process_pids(cid):
            _kill_pid(pid)
        removed["processes"] = len(pids)
        removed["runsc_state"] = had_state
        cg = Cgroup(f"/{self.config.cgroup_parent}/{cid}", self.cgroup_version)
        dirs = cg.existing_dirs()
        left = await cg.remove()
        removed["cgroups"] = len(dirs) - len(left)
        bundle = self._base / cid
        removed["bundle"] = bundle.exists()
        shutil.rmtree(bundle, ignore_errors=True)
        return removed

def _instance_of(cid: str) -> str | None:
    if not cid.startswith(ID_PREFIX):
        return None
    inst, sep, _ = cid[len(ID_PREFIX) :].partition("-")
    return inst if sep and len(inst) == 8 else None


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


async def _pump(stream: anyio.abc.ByteReceiveStream | None, capture: BoundedCapture) -> None:
    if stream is None:
        return
    while True:
        try:
            chunk = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        await capture.feed(chunk)


async def _feed(stream: anyio.abc.ByteSendStream, data: object) -> None:
    try:
        if isinstance(data, bytes):
            view = memoryview(data)
            for i in range(0, len(view), 65536):
                await stream.send(bytes(view[i : i + 65536]))
        else:
            async for chunk in data:  # type: ignore[attr-defined]
                await stream.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError):
        pass  # the command stopped reading; not an error
    finally:
        try:
            await stream.aclose()
        except (anyio.BrokenResourceError, BrokenPipeError, OSError):
            pass


def _runsc_error(log_path: Path) -> str | None:
    """runsc's own error, if its JSON log has one (the command's stderr is separate)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("level") in ("error", "fatal", "panic"):
            return str(entry.get("msg", ""))[:2000]
    return None


def _log_fields(r: ContainerResult) -> dict:
    return {
        "status": r.status.value,
        "exit_code": r.exit_code,
        "duration_ms": math.floor(r.duration * 1000),
        "boot_ms": math.floor(r.boot_duration * 1000),
        "peak_memory_bytes": r.peak_memory_bytes,
        "stdout_bytes": r.stdout_bytes,
        "stderr_bytes": r.stderr_bytes,
    }


CANARY = ("/bin/sh", "-c", "ls -l / >/dev/null && echo ok")
"""Debian 12's own runsc (2022) fails `ls -l /` with EINVAL (statx): this
catches it, and anything else that keeps a sandbox from running a command."""


async def canary(manager: Manager, timeout: float = 30.0) -> tuple[bool, str]:
    """Run the canary in a sandbox; (passed, detail). Never raises."""
    try:
        r = await manager.run(
            ContainerOptions(command=CANARY, resources=ResourceSpec(timeout=timeout))
        )
    except Exception as e:  # doctor and serve report it, they do not crash
        return False, f"{type(e).__name__}: {e}"
    if r.status is ContainerStatus.EXITED and r.exit_code == 0 and r.stdout.strip() == b"ok":
        return True, f"ok in {r.duration * 1000:.0f} ms (boot {r.boot_duration * 1000:.0f} ms)"
    detail = (r.stderr or r.stdout).decode(errors="replace").strip()[:500]
    return False, f"{r.summary()}: {detail}"
