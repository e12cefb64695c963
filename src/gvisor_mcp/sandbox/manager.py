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
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
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
from .runsc import BootWatch, RunProcess, Runsc, RunscError
from .pool import EXIT_MARK, STUB_COMMAND, PoolKey, PoolTarget, WarmPool, WarmSandbox, claim_line, pool_key
from .spec import DEFAULT_ENV, build_spec, check_workdir

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
    pool_max_age: float = Field(default=300.0, gt=0)
    """Seconds a pooled sandbox may wait for a claim before it is recycled."""
    boot_timeout: float = Field(default=30.0, gt=0)
    """Seconds a pooled sandbox may take to boot."""

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
class Sandbox:
    """One container's host side: bundle, cgroup, boot watch and runsc process."""

    container_id: str
    bundle: Path
    cgroup: Cgroup
    watch: BootWatch | None = None
    process: RunProcess | None = None


@dataclass
class ActiveRun:
    """A run in flight, as list_active() shows it."""

    run_id: str
    """The caller's handle (kill() takes it); the container id unless given."""
    container_id: str
    command: tuple[str, ...]
    started_at: float  # wall clock
    started_mono: float
    resources: ResourceSpec
    reason: ContainerStatus | None = None
    process: RunProcess | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    cancel_scope: anyio.CancelScope | None = None
    warm: bool = False
    claimed_at: float | None = None
    teardown_pending: bool = False
    """The result was returned; the sandbox is still being removed (holds its slot)."""
    slot: object | None = None
    """The capacity token's borrower."""


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
        self.pool = WarmPool(self.config.pool_max_age)
        self._booting_ids: set[str] = set()
        self._tearing: set[str] = set()
        """Sandboxes whose run already returned, still exiting (warm early answers)."""
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Manager:
        """Inside `async with`, the Manager keeps its warm pool filled."""
        self._tg = await anyio.create_task_group().__aenter__()
        self._tg.start_soon(self._maintain_pool)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)

    # --- public API ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def active_containers(self) -> int:
        """The number of containers currently running."""
        return len(self._active)

    def active_runs(self) -> list[ActiveRun]:
        return list(self._active.values())

    def active_run(self, run_id: str) -> ActiveRun | None:
        return self._active.get(run_id)

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

    async def run(self, options: ContainerOptions, *, run_id: str | None = None) -> ContainerResult:
        """Run one command in a fresh sandbox and destroy it.

        A command that fails is a normal result; only infrastructure failures
        before the command ran raise (SandboxError, RunscError). Invalid
        options raise InvalidOptionsError before anything is created.
        Cancelling the awaiting task kills the container, removes everything,
        and re-raises the cancellation. `run_id` is the caller's handle for
        kill() and active_runs() (default: the container id).
        """
        if self._closed:
            raise ManagerClosedError()
        res = self.prepare(options)
        key = pool_key(options, res)
        slot = object()  # the borrower of one capacity token (may outlive this call)
        await self._limiter.acquire_on_behalf_of(slot)
        run: ActiveRun | None = None
        try:
            if self._closed:
                raise ManagerClosedError()
            warm = self.pool.claim(key)
            if warm is None:
                await self._make_room()
            cid = warm.container_id if warm else self.new_container_id()
            rid = run_id or cid
            if rid in self._active:
                raise InvalidOptionsError("run_id", rid, "an id not already running")
            run = ActiveRun(
                run_id=rid,
                container_id=cid,
                command=options.command,
                started_at=time.time(),
                started_mono=time.monotonic(),
                resources=res,
                warm=warm is not None,
                slot=slot,
            )
            self._active[rid] = run
            try:
                return await self._execute(run, options, res, warm)
            finally:
                del self._active[rid]
                run.done.set()
                self.pool.wake()
        finally:
            if run is None or not run.teardown_pending:
                self._limiter.release_on_behalf_of(slot)

    def warm(self, template: ContainerOptions, size: int) -> None:
        """Keep `size` sandboxes booted for requests shaped like `template`
        (same image, network, user, mounts, process limit); 0 stops it.
        Takes effect inside `async with manager`."""
        res = self.prepare(template)
        key = pool_key(template, res)
        if key is None:
            raise InvalidOptionsError("template", template.command, "options the pool can serve (built-in image)")
        if size <= 0:
            self.pool.targets.pop(key, None)
        else:
            self.pool.targets[key] = PoolTarget(template=template, size=size)
        self.pool.wake()

    async def wait_warm(self, template: ContainerOptions, timeout: float = 30.0) -> bool:
        """Wait until the pool for `template` is full (tests and benchmarks)."""
        key = pool_key(template, self.prepare(template))
        with anyio.move_on_after(timeout):
            while True:
                target = self.pool.targets.get(key)
                if target is None or len(self.pool.ready.get(key, [])) >= target.size:
                    return target is not None
                await self.pool.changed.wait()
        return False

    async def kill(self, run_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        """Kill a running run (by run_id); its run() returns with `reason` as status."""
        run = self._active.get(run_id)
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
            self.pool.targets.clear()
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for run in runs:
                        tg.start_soon(self._terminate, run, ContainerStatus.KILLED)
                    for warm in self.pool.take_all():
                        tg.start_soon(self._destroy_warm, warm)
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
            if inst == self.instance and cid in self._owned_ids():
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

    async def _create_sandbox(
        self,
        cid: str,
        options: ContainerOptions,
        res: ResourceSpec,
        *,
        command: tuple[str, ...],
        stdin: bool,
    ) -> Sandbox:
        """Bundle, cgroup and a started `runsc run` (booting); torn down on failure."""
        sb = Sandbox(
            container_id=cid,
            bundle=self._base / cid,
            cgroup=Cgroup(f"/{self.config.cgroup_parent}/{cid}", self.cgroup_version),
        )
        try:
            sb.bundle.mkdir(mode=0o700)
            root = None
            if options.rootfs is None:
                root = sb.bundle / "rootfs"
                make_root(
                    root,
                    [m.destination for m in options.extra_mounts] + [options.workdir],
                    self._system,
                )
            spec = build_spec(
                options.model_copy(update={"command": command}),
                root_path=str(root) if root else None,
                etc_dir=str(self._etc),
                cgroups_path=sb.cgroup.rel,
                resources=res,
            )
            (sb.bundle / "config.json").write_text(json.dumps(spec))
            sb.cgroup.create(res)
            sb.watch = BootWatch(self.runsc, cid)
            sb.process = await self.runsc.open_run(
                cid, str(sb.bundle), options.network, str(sb.bundle / "runsc.log"), stdin=stdin
            )
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._teardown(sb)
            if isinstance(e, OSError):
                raise SandboxError(f"could not prepare the sandbox: {e}") from e
            raise
        return sb

    async def _execute(
        self,
        run: ActiveRun,
        options: ContainerOptions,
        res: ResourceSpec,
        warm: WarmSandbox | None,
    ) -> ContainerResult:
        t0 = time.monotonic()
        out = BoundedCapture(res.max_output_bytes, options.stdout_writer)
        err = BoundedCapture(res.max_output_bytes, options.stderr_writer)
        header: bytes | None = None
        mark: str | None = None
        if warm is not None:
            sb = warm.sandbox
            try:
                sb.cgroup.apply(res)
            except OSError as e:  # e.g. a limit below what the idle sandbox uses
                await self._destroy_warm(warm)
                raise SandboxError(f"could not apply limits to a pooled sandbox: {e}") from e
            sb.cgroup.reset_peak()
            env = dict(DEFAULT_ENV)
            env.update(options.env or {})
            mark = EXIT_MARK.format(nonce=secrets.token_hex(16))
            header = claim_line(options, env, mark, warm.env_keys)
        else:
            sb = await self._create_sandbox(
                run.container_id, options, res,
                command=options.command, stdin=options.stdin is not None,
            )
        oom_before = sb.cgroup.stats().oom_kills if warm else 0
        early: int | None = None
        proc = sb.process
        assert proc is not None
        try:
            run.process = proc
            early = await self._supervise(
                run, sb, options, res, out, err, header, mark.encode() if mark else None
            )
            duration = time.monotonic() - t0
            if early is not None:
                returncode = early
            else:
                returncode = proc.returncode if proc.returncode is not None else -1
            stats = sb.cgroup.stats()
            oom_kills = stats.oom_kills - oom_before
            runsc_error = _runsc_error(sb.bundle / "runsc.log")
            if warm is not None:
                boot = (run.claimed_at - t0) if run.claimed_at else None
            else:
                boot = (sb.watch.running_at - t0) if sb.watch and sb.watch.running_at else None
            if runsc_error and boot is None and run.reason is None:
                raise SandboxError(f"runsc failed before the command started: {runsc_error}")
            status, error = self._status(run, oom_kills, runsc_error)
            signal = returncode - 128 if 128 < returncode <= 128 + 64 else None
            if returncode < 0:  # the runsc client itself died of a signal
                signal = -returncode
            result = ContainerResult(
                container_id=sb.container_id,
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
                oom_killed=oom_kills > 0,
                peak_memory_bytes=stats.peak_memory_bytes,
                signal=signal,
                error=error,
                warm=warm is not None,
            )
            log.info("run", container_id=sb.container_id, warm=result.warm, **_log_fields(result))
            return result
        finally:
            if early is not None and self._tg is not None:
                # The command is done and reported; the sandbox still has to
                # exit (~50 ms). Answer now, finish that in the background:
                # its capacity slot stays taken until it is gone.
                run.teardown_pending = True
                self._tearing.add(sb.container_id)
                self._tg.start_soon(self._teardown_later, run, sb)
            else:
                with anyio.CancelScope(shield=True):
                    await self._teardown(sb)

    def _close_watch(self, watch: BootWatch) -> None:
        """Close a BootWatch's inotify fd off the event loop (see BootWatch.detach)."""
        fd = watch.detach()
        if fd < 0:
            return
        if self._tg is None:
            os.close(fd)
            return

        async def close() -> None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(os.close, fd)

        self._tg.start_soon(close)

    async def _teardown_later(self, run: ActiveRun, sb: Sandbox) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._teardown(sb)
            finally:
                self._tearing.discard(sb.container_id)
                self._limiter.release_on_behalf_of(run.slot)
                self.pool.wake()

    async def _supervise(
        self,
        run: ActiveRun,
        sb: Sandbox,
        options: ContainerOptions,
        res: ResourceSpec,
        out: BoundedCapture,
        err: BoundedCapture,
        header: bytes | None,
        mark: bytes | None = None,
    ) -> int | None:
        """Run to the end; with `mark` (a warm claim), the command's exit
        status as soon as the stub reported it on both streams, else None
        once the runsc client has exited."""
        proc = sb.process
        assert proc is not None
        marks: dict[str, bytes] = {}
        try:
            async with anyio.create_task_group() as tg:
                run.cancel_scope = tg.cancel_scope
                if header is None and sb.watch is not None and sb.watch.available:
                    tg.start_soon(sb.watch.wait)
                if res.timeout:
                    tg.start_soon(self._deadline, run, res.timeout)
                if proc.stdin is not None:
                    tg.start_soon(self._feed, run, proc.stdin, header, options.stdin)

                async def pump(name: str, stream: Any, capture: BoundedCapture, extra: int) -> None:
                    got = await _pump(stream, capture, mark, extra)
                    if got is not None:
                        marks[name] = got

                async with anyio.create_task_group() as io:
                    io.start_soon(pump, "stdout", proc.stdout, out, 0)
                    io.start_soon(pump, "stderr", proc.stderr, err, 3)
                early = None
                if len(marks) == 2 and marks["stderr"].isdigit() and run.reason is None:
                    early = int(marks["stderr"])
                else:
                    await proc.wait()
                tg.cancel_scope.cancel()
                return early
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

    @staticmethod
    async def _feed(
        run: ActiveRun,
        stream: anyio.abc.ByteSendStream,
        header: bytes | None,
        data: bytes | AsyncIterable[bytes] | None,
    ) -> None:
        """The claim line (warm), then the caller's stdin, then EOF."""
        try:
            if header is not None:
                await stream.send(header)
                run.claimed_at = time.monotonic()
            if isinstance(data, bytes):
                view = memoryview(data)
                for i in range(0, len(view), 65536):
                    await stream.send(bytes(view[i : i + 65536]))
            elif data is not None:
                async for chunk in data:
                    await stream.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError):
            pass  # the command stopped reading; not an error
        finally:
            try:
                await stream.aclose()
            except (anyio.BrokenResourceError, BrokenPipeError, OSError):
                pass

    # --- the warm pool --------------------------------------------------------

    def _owned_ids(self) -> set[str]:
        return (
            {r.container_id for r in self._active.values()}
            | self.pool.container_ids()
            | self._booting_ids
            | self._tearing
        )

    async def _make_room(self) -> None:
        """A cold run is starting: keep runs + pooled sandboxes within capacity."""
        while (
            len(self._active) + len(self._tearing) + 1 + self.pool.in_flight()
            > self.config.max_concurrent_containers
            and self.pool.idle()
        ):
            warm = self.pool.take_oldest()
            if warm is None:
                break
            assert self._tg is not None
            self._tg.start_soon(self._destroy_warm, warm)

    async def _maintain_pool(self) -> None:
        while not self._closed:
            for warm in self.pool.expired():
                self._tg.start_soon(self._destroy_warm, warm)  # type: ignore[union-attr]
            for key, target in list(self.pool.targets.items()):
                have = len(self.pool.ready.get(key, [])) + self.pool.booting.get(key, 0)
                for _ in range(target.size - have):
                    used = len(self._active) + len(self._tearing) + self.pool.in_flight()
                    if used >= self.config.max_concurrent_containers:
                        break
                    self.pool.booting[key] = self.pool.booting.get(key, 0) + 1
                    self._tg.start_soon(self._boot_warm, key, target.template)  # type: ignore[union-attr]
            with anyio.move_on_after(1.0):
                await self.pool.changed.wait()

    async def _boot_warm(self, key: PoolKey, template: ContainerOptions) -> None:
        cid = self.new_container_id()
        self._booting_ids.add(cid)
        sb: Sandbox | None = None
        try:
            res = template.resources.merged_over(self.config.default_resources)
            sb = await self._create_sandbox(cid, template, res, command=STUB_COMMAND, stdin=True)
            assert sb.watch is not None and sb.process is not None
            with anyio.move_on_after(self.config.boot_timeout):
                async with anyio.create_task_group() as tg:

                    async def exited() -> None:
                        await sb.process.wait()  # type: ignore[union-attr]
                        tg.cancel_scope.cancel()

                    tg.start_soon(exited)
                    await sb.watch.wait()
                    tg.cancel_scope.cancel()
            if self._closed or key not in self.pool.targets:
                return  # no longer wanted: the finally clause stops it
            if sb.watch.running_at is None or sb.process.returncode is not None:
                raise SandboxError("pooled sandbox did not boot in time")
            self._close_watch(sb.watch)
            self.pool.ready.setdefault(key, []).append(WarmSandbox(
                container_id=cid, key=key, sandbox=sb,
                env_keys=tuple({**DEFAULT_ENV, **(template.env or {})}),
            ))
            sb = None
        except Exception as e:
            log.warning("pool_boot_failed", container_id=cid, error=str(e))
            await anyio.sleep(1.0)  # do not spin on a persistent failure
        finally:
            if sb is not None:
                with anyio.CancelScope(shield=True):
                    await self._stop_idle(sb)
            self._booting_ids.discard(cid)
            self.pool.booting[key] -= 1
            self.pool.wake()

    async def _destroy_warm(self, warm: WarmSandbox) -> None:
        with anyio.CancelScope(shield=True):
            await self._stop_idle(warm.sandbox)

    async def _stop_idle(self, sb: Sandbox) -> None:
        """An unclaimed sandbox: EOF on the stub's stdin ends it cleanly."""
        proc = sb.process
        if proc is not None and proc.stdin is not None:
            try:
                await proc.stdin.aclose()
            except (anyio.BrokenResourceError, BrokenPipeError, OSError):
                pass
        if proc is not None:
            with anyio.move_on_after(self.config.kill_grace):
                async with anyio.create_task_group() as tg:
                    for stream in (proc.stdout, proc.stderr):
                        tg.start_soon(_pump, stream, BoundedCapture(0))
                await proc.wait()
            if proc.returncode is None:
                await self.runsc.kill(sb.container_id)
                await self.runsc.delete(sb.container_id)
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        await self._teardown(sb)

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

    async def _teardown(self, sb: Sandbox) -> None:
        """Remove runsc state, the cgroup and the bundle. Never raises."""
        cid = sb.container_id
        try:
            if sb.watch is not None:
                self._close_watch(sb.watch)
            proc = sb.process
            if proc is not None:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
                if proc.returncode is None:
                    with anyio.move_on_after(self.config.kill_grace):
                        await proc.wait()
            if self.runsc.has_state(cid):
                await self.runsc.delete(cid)
                self.runsc.remove_state_files(cid)
            left = await sb.cgroup.remove()
            if left:
                for pid in self.runsc.process_pids(cid):
                    _kill_pid(pid)
                left = await sb.cgroup.remove()
            if left:
                log.warning("cgroup_left", container_id=cid, paths=[str(p) for p in left])
            shutil.rmtree(sb.bundle, ignore_errors=True)
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


async def _pump(
    stream: anyio.abc.ByteReceiveStream | None,
    capture: BoundedCapture,
    mark: bytes | None = None,
    extra: int = 0,
) -> bytes | None:
    """Copy a stream into `capture` until EOF, or until `mark` and `extra`
    more bytes arrive (returned; neither is captured). None at EOF."""
    if stream is None:
        return None
    held = b""  # a possible beginning of the mark, not yet captured
    while True:
        try:
            chunk = await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            await capture.feed(held)
            return None
        if not mark:
            await capture.feed(chunk)
            continue
        data = held + chunk
        # The stub writes the mark last, so look only near the end: a full
        # `find` over every chunk of a flood cost ~0.7 ms per 150 KB (most of
        # a warm flood's time). A mark followed by more than 64 bytes (a
        # background child still writing) is missed: the run then ends the
        # slow way, when the sandbox exits.
        at = data.find(mark, max(0, len(data) - len(mark) - extra - 64))
        if at >= 0:
            if len(data) >= at + len(mark) + extra:
                await capture.feed(data[:at])
                return data[at + len(mark) : at + len(mark) + extra]
            await capture.feed(data[:at])
            held = data[at:]
        else:
            # Hold back only a tail that could begin the mark, so live output
            # (`echo started; sleep 60`) reaches the writers at once.
            n = _mark_prefix(data, mark)
            await capture.feed(data[: len(data) - n])
            held = data[len(data) - n :]


def _mark_prefix(data: bytes, mark: bytes) -> int:
    """Length of the longest end of `data` that is a beginning of `mark`."""
    for n in range(min(len(mark) - 1, len(data)), 0, -1):
        if data.endswith(mark[:n]):
            return n
    return 0


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
