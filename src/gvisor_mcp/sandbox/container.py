"""One container's lifetime: created, given a command, supervised, killed,
torn down.

A Container is the host side of one gVisor sandbox (bundle directory with
config.json and, for the built-in image, an empty per-run root; a cgroup leaf
we create and fill with limits; a boot watch; the foreground `runsc run`
client) and, once a command is assigned to it (`begin`), the run in flight
that `Manager.active_runs()` shows and `Manager.kill()` stops. A cold run
creates it for its command; a warm run gets one the pool booted with the
stub (stub.py) and claims it. Never reused: `teardown` removes runsc state,
cgroup and bundle, and runs at most once.

Why over ~400 lines: one container's lifetime is one state machine (create,
boot, claim, supervise, kill, teardown); split, its invariants (teardown at
most once, the deadline, the early answer) would be read across files.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from .cgroups import limits_of
from .errors import SandboxError
from .host import Host, Launched, kill_pid
from .network import NetworkHandle
from .options import ContainerOptions, NetworkMode, ResourceSpec
from .outfile import OutputFile
from .output import BoundedCapture, accepts_skips, feed, pump
from .result import ContainerResult, ContainerStatus
from .rootfs import make_root
from .runsc import BootWatch, Launch, RunProcess, go_line, meminfo_mount, meminfo_text
from .spec import DEFAULT_ENV, build_spec
from .stub import claim_line

log = structlog.get_logger("gvisor_mcp.sandbox")


class Container:
    def __init__(self, host: Host, container_id: str, *, freezable: bool = False) -> None:
        """`freezable`: a pooled sandbox, which the pool may freeze while it
        idles (v1: its cgroup gets a freezer leaf too; pool.py)."""
        self.host = host
        self.container_id = container_id
        self.bundle = host.base / container_id
        self.cgroup = host.cgroup(container_id)
        self.cgroup.freezer = freezable
        self.frozen = False
        """Frozen by freeze() and not thawed since: nothing in it runs, not
        even the stub reading its stdin's EOF, nor a SIGKILL."""
        self.watch: BootWatch | None = None
        self.process: RunProcess | None = None
        self.net: NetworkHandle | None = None
        """network=sandbox: the prepared namespace (closed after runsc exits)."""
        # The run, once begin() assigned one (a pooled container waits without).
        self.run_id = container_id
        """The caller's handle (kill() takes it); the container id unless given."""
        self.command: tuple[str, ...] = ()
        self.started_at = 0.0  # wall clock
        self.started_mono = 0.0
        self.resources = ResourceSpec()
        self.warm = False
        self.slot: object | None = None
        """The capacity token's borrower (may outlive the run: see Manager)."""
        self.reason: ContainerStatus | None = None
        """Why we stopped it (first reason wins); None while nobody did."""
        self.done = anyio.Event()
        self.cancel_scope: anyio.CancelScope | None = None
        self.claimed_at: float | None = None
        self.answered_early = False
        """The result can be returned before the teardown: the stub reported
        the exit status (warm; the sandbox may still be exiting), or the
        result was built (the rest is cleanup); the Manager tears down in
        the background (Manager._after)."""
        self.exit_mark: str | None = None
        """A pooled stub's exit mark (stub.py), given to it at boot."""
        self.waited = 0.0
        self.launched: Launched | None = None
        """A cold run's launcher started ahead (a started spare, spares.py)."""
        self.spare_key: tuple[tuple[str, ...], str] | None = None
        """A cold run of the started spares' shape: (mountpoints, shape), to replace after it."""
        self._torn_down = False

    @classmethod
    async def cold(cls, host: Host, options: ContainerOptions) -> Container:
        """The container of a cold run: a started spare's when one of its
        shape is ready (the container id is the spare's), else a new one."""
        shape = spare_shape(host, options)
        if shape is None:
            return cls(host, host.new_container_id())
        key = (mountpoints_of(options), shape)
        spare = await host.spares.take_started(*key, lambda launched: launched.waiting)
        c = cls(host, spare.cid if spare is not None else host.new_container_id())
        c.spare_key = key
        if spare is not None:
            c.launched = spare.started
            c.net = c.launched.net  # network=sandbox: its namespace, made ahead; closed by teardown
        return c

    def replace_spare(self) -> None:
        """After a cold run of the started spares' shape: make the next one
        (off its clock: made at its start, it would take CPU from its boot)."""
        if self.spare_key is not None:
            self.host.start_soon(self.host.spares.refill, *self.spare_key)

    def begin(
        self,
        run_id: str,
        command: tuple[str, ...],
        resources: ResourceSpec,
        *,
        warm: bool,
        slot: object,
        waited: float = 0.0,
    ) -> None:
        """`waited`: seconds the run already waited for this (pooled) sandbox
        to finish booting; its result's duration and boot_duration count them."""
        self.waited = waited
        self.run_id = run_id
        self.command = command
        self.resources = resources
        self.warm = warm
        self.slot = slot
        self.started_at = time.time()
        self.started_mono = time.monotonic()

    async def start(
        self,
        options: ContainerOptions,
        res: ResourceSpec,
        *,
        command: tuple[str, ...],
        stdin: bool,
        run_id: str | None = None,
        output_files: bool = False,
        stdout_file: bool = False,
    ) -> None:
        """Bundle, cgroup and a started `runsc run` (booting); torn down on failure.

        `output_files`: the sandbox writes its stdout/stderr to files in the
        bundle (outfile.py) instead of our pipes; `stdout_file`: stdout only
        (a pooled stub: its stderr pipe carries the exit status, stub.py).

        network=sandbox: a namespace from the host's network provider, bound
        to `run_id` before runsc starts (a pooled sandbox, run_id None, binds
        at claim)."""
        host = self.host
        try:
            mountpoints = mountpoints_of(options)
            root = None
            if self.launched is not None:
                # Bundle, root, cgroup leaf, output files and the launcher
                # in the leaf: made ahead (spares.py, Host.start_spare).
                self.process = self.launched.process
                root = self.bundle / "rootfs"
            elif options.rootfs is None and host.spares.take(mountpoints, self.bundle):
                root = self.bundle / "rootfs"  # made ahead (spares.py)
            else:
                self.bundle.mkdir(mode=0o700)
                if options.rootfs is None:
                    root = self.bundle / "rootfs"
                    make_root(root, list(mountpoints), host.system)
            if self.spare_key is not None and self.launched is None:
                # None was ready (the first run of its shape, or a burst):
                # start making them now, as roots were made before.
                host.start_soon(host.spares.refill, *self.spare_key)
            elif options.rootfs is None and self.spare_key is None:
                host.start_soon(host.spares.refill, mountpoints)
            update: dict[str, Any] = {"command": command}
            if options.network is NetworkMode.SANDBOX:
                if self.net is None:  # else a started spare's
                    self.net = await self._open_network()
                update["env"] = {**(options.env or {}), **self.net.env}
                if run_id is not None:
                    self.net.start(run_id, options.egress)
            spec = build_spec(
                options.model_copy(update=update),
                root_path=str(root) if root else None,
                etc_dir=str(host.etc),
                cgroups_path=self.cgroup.rel,
                resources=res,
                netns_path=self.net.netns_path if self.net else None,
            )
            if self.launched is not None:
                self.launched.write_config(json.dumps(spec).encode())
                await self._go(res, stdin)
                return
            (self.bundle / "config.json").write_text(json.dumps(spec))
            self.cgroup.create(res)
            self.watch = BootWatch(host.runsc, self.container_id)
            outputs = None
            if output_files or stdout_file:
                # A pooled stub's stdout turns O_APPEND after boot (PoolKeeper._boot).
                stdout = OutputFile(self.bundle / "stdout", append_after_boot=not output_files)
                try:
                    outputs = (stdout, OutputFile(self.bundle / "stderr") if output_files else None)
                except BaseException:
                    await stdout.aclose()
                    raise
            self.process = await host.runsc.open_run(
                self.container_id,
                str(self.bundle),
                options.network,
                str(self.bundle / "runsc.log"),
                stdin=stdin,
                launch=self._launch(options, res),
                outputs=outputs,
            )
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self.teardown()
            if isinstance(e, OSError):
                raise SandboxError(f"could not prepare the sandbox: {e}") from e
            raise

    async def _go(self, res: ResourceSpec, stdin: bool) -> None:
        """Start a started spare's runsc: the run's limits on the leaf the
        launcher waits in, peak memory counted from here, then its go line."""
        proc = self.process
        assert proc is not None and proc.stdin is not None and self.launched is not None
        if limits_of(res) != limits_of(self.launched.limits):
            self.cgroup.apply(res)
        self.cgroup.reset_peak()
        self.watch = BootWatch(self.host.runsc, self.container_id)
        try:
            # Without stdin the launcher swaps its stdin for /dev/null; our end
            # is closed by _supervise's feed, off the way to the boot.
            await proc.stdin.send(go_line(stdin))
        except (anyio.BrokenResourceError, BrokenPipeError, OSError) as e:
            raise SandboxError(f"the sandbox's launcher ended before it was started (exit {proc.returncode})") from e

    async def _open_network(self) -> NetworkHandle:
        """The provider's namespace; any failure is a SandboxError (status error),
        never a silent fall-back to another network mode."""
        provider = self.host.network
        if provider is None:
            raise SandboxError("network=sandbox needs a network provider, and this Manager has none")
        try:
            return await provider.open(self.container_id)
        except Exception as e:
            raise SandboxError(f"could not prepare the sandbox's network namespace: {e}") from e

    def _launch(self, options: ContainerOptions, res: ResourceSpec) -> Launch:
        """What the `runsc run` client does before it execs runsc (one
        launcher for everything a run needs; runsc.Launch): join the run's
        leaf (cgroup_prejoin) and, with report_memory_limit, read the memory
        limit as the host's MemTotal, which runsc passes on to the sandbox.
        (network=sandbox's /proc/sys/net cover is added by Runsc.run_argv.)"""
        config = self.host.config
        joins: tuple[str, ...] = ()
        mounts: list[tuple[str, ...]] = []
        if config.cgroup_prejoin:
            joins = self.cgroup.procs_files()
            if res.memory_mb and config.report_memory_limit:
                meminfo = self.bundle / "meminfo"
                meminfo.write_text(meminfo_text(res.memory_mb * 1024 * 1024))
                mounts.append(meminfo_mount(str(meminfo)))
        return Launch(join_cgroups=joins, mounts=tuple(mounts))

    async def execute(
        self, options: ContainerOptions, res: ResourceSpec, inherited_env: tuple[str, ...] | None
    ) -> ContainerResult:
        """Run `options.command` to its end and tell what happened.

        `inherited_env` is None for a cold run (the container is created
        here); for a warm one, the variables the pooled stub started with.
        The caller tears the container down afterwards (see answered_early).
        """
        t0 = time.monotonic() - self.waited
        out = BoundedCapture(res.max_output_bytes, options.stdout_writer)
        err = BoundedCapture(res.max_output_bytes, options.stderr_writer)
        header: bytes | None = None
        mark: str | None = None
        if inherited_env is not None:
            try:
                self.cgroup.apply(res)
            except OSError as e:  # e.g. a limit below what the idle sandbox uses
                with anyio.CancelScope(shield=True):
                    await self.stop_idle()
                raise SandboxError(f"could not apply limits to a pooled sandbox: {e}") from e
            self.cgroup.reset_peak()
            env = dict(DEFAULT_ENV)
            env.update(options.env or {})
            if self.net is not None:
                try:
                    self.net.start(self.run_id, options.egress)
                except Exception as e:
                    with anyio.CancelScope(shield=True):
                        await self.stop_idle()
                    raise SandboxError(f"could not start the pooled sandbox's network: {e}") from e
                env.update(self.net.env)
            mark = self.exit_mark
            header = claim_line(options, env, inherited_env)
        else:
            await self.start(
                options,
                res,
                command=options.command,
                stdin=options.stdin is not None,
                run_id=self.run_id,
                output_files=self.host.output_files
                and accepts_skips(options.stdout_writer)
                and accepts_skips(options.stderr_writer),
            )
        oom_before = self.cgroup.stats().oom_kills if self.warm else 0
        proc = self.process
        assert proc is not None
        early = await self._supervise(options, res, out, err, header, mark.encode() if mark else None)
        self.answered_early = early is not None
        duration = time.monotonic() - t0
        if early is not None:
            returncode = early
        else:
            returncode = proc.returncode if proc.returncode is not None else -1
        stats = self.cgroup.stats()
        oom_kills = stats.oom_kills - oom_before
        runsc_error = _runsc_error(self.bundle / "runsc.log")
        if self.warm:
            boot = (self.claimed_at - t0) if self.claimed_at else None
        else:
            boot = (self.watch.running_at - t0) if self.watch and self.watch.running_at else None
        if runsc_error and boot is None and self.reason is None:
            raise SandboxError(f"runsc failed before the command started: {runsc_error}")
        status, error = self._status(oom_kills, runsc_error)
        if self.net is not None and self.net.failure:
            status, error = ContainerStatus.ERROR, self.net.failure
        signal = returncode - 128 if 128 < returncode <= 128 + 64 else None
        if returncode < 0:  # the runsc client itself died of a signal
            signal = -returncode
        result = ContainerResult(
            container_id=self.container_id,
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
            warm=self.warm,
            network=self.net.report() if self.net is not None else None,
        )
        log.info("run", container_id=self.container_id, warm=result.warm, **result.log_fields())
        # A cold run's sandbox is gone once its client exited: what is left
        # (cgroup, bundle, runsc state) is cleanup that cannot change the
        # result, so it is answered now and torn down after, like a warm
        # run (Manager._after; its capacity slot stays taken until then).
        self.answered_early = True
        return result

    async def _supervise(
        self,
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
        proc = self.process
        assert proc is not None
        marks: dict[str, bytes] = {}
        try:
            async with anyio.create_task_group() as tg:
                self.cancel_scope = tg.cancel_scope
                if header is None and self.watch is not None and self.watch.available:
                    tg.start_soon(self.watch.wait)
                if res.timeout:
                    tg.start_soon(self._deadline, res.timeout)
                if proc.stdin is not None:
                    tg.start_soon(feed, proc.stdin, header, options.stdin, self._claimed)
                if self.net is not None:
                    tg.start_soon(self._watch_network, self.net)

                async def pump_one(name: str, stream: Any, capture: BoundedCapture, extra: int) -> None:
                    if isinstance(stream, OutputFile):
                        # A pooled stub's stdout file: its stderr's mark ends it.
                        if await stream.pump(capture, stderr_done if mark else exited, mark, exited):
                            marks[name] = b""
                        return
                    try:
                        got = await pump(stream, capture, mark, extra)
                    finally:
                        if name == "stderr":
                            stderr_done.set()
                    if got is not None:
                        marks[name] = got

                exited = anyio.Event()
                stderr_done = anyio.Event()
                if isinstance(proc.stdout, OutputFile):
                    # No EOF on a file: the pumps take their last look once the client is gone.
                    async def wait_exit() -> None:
                        await proc.wait()
                        exited.set()

                    tg.start_soon(wait_exit)

                async with anyio.create_task_group() as io:
                    io.start_soon(pump_one, "stdout", proc.stdout, out, 0)
                    io.start_soon(pump_one, "stderr", proc.stderr, err, 3)
                early = None
                if len(marks) == 2 and marks["stderr"].isdigit() and self.reason is None:
                    early = int(marks["stderr"])
                else:
                    await proc.wait()
                tg.cancel_scope.cancel()
                return early
            return None  # the task group absorbed its own cancellation before the return above
        except BaseException:
            # Cancelled from outside (or a writer raised): the container must
            # not outlive this call.
            with anyio.CancelScope(shield=True):
                if self.reason is None:
                    self.reason = ContainerStatus.KILLED
                await self.terminate(self.reason)
                with anyio.move_on_after(self.host.config.kill_grace):
                    await proc.wait()
                if proc.returncode is None:
                    await self.force_delete()
            raise

    def _claimed(self) -> None:
        self.claimed_at = time.monotonic()

    async def _watch_network(self, net: NetworkHandle) -> None:
        """The network side broke (its proxy died): the run ends as an error."""
        await net.wait_failed()
        await self.terminate(ContainerStatus.ERROR)

    async def _deadline(self, timeout: float) -> None:
        await anyio.sleep(timeout)
        await self.terminate(ContainerStatus.TIMED_OUT)

    def _status(self, oom_kills: int, runsc_error: str | None) -> tuple[ContainerStatus, str | None]:
        if self.reason is not None:
            return self.reason, None
        if oom_kills > 0:
            return ContainerStatus.OOM_KILLED, None
        if runsc_error:
            return ContainerStatus.ERROR, f"runsc: {runsc_error}"
        return ContainerStatus.EXITED, None

    async def terminate(self, reason: ContainerStatus) -> None:
        """Kill the container (first reason wins); force after kill_grace."""
        if self.reason is None:
            self.reason = reason
        runsc, grace = self.host.runsc, self.host.config.kill_grace
        proc = self.process
        deadline = time.monotonic() + grace
        while proc is None or proc.returncode is None:
            if await runsc.kill(self.container_id):
                break
            if time.monotonic() > deadline:
                break
            # Not created yet (or mid-boot): try again shortly.
            await anyio.sleep(0.05)
            proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with anyio.move_on_after(grace):
            while proc.returncode is None:
                await anyio.sleep(0.05)
            return
        await self.force_delete()

    async def force_delete(self) -> None:
        await self.host.runsc.delete(self.container_id)
        proc = self.process
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    def close_watch(self) -> None:
        """Close the BootWatch's inotify fd off the event loop (see BootWatch.detach)."""
        if self.watch is not None:
            self.host.close_fd_later(self.watch.detach())

    @property
    def torn_down(self) -> bool:
        """teardown() has begun (it thaws first): nothing of it is the pool's any more."""
        return self._torn_down

    def freeze(self) -> bool:
        """Freeze an idle pooled sandbox (its systrap sentry otherwise polls
        ~40-60 ms of CPU per second; pool.py). False when it could not be."""
        try:
            self.cgroup.freeze()
        except OSError as e:
            log.warning("freeze_failed", container_id=self.container_id, error=str(e))
            return False
        self.frozen = True
        return True

    def thaw(self) -> bool:
        """Before anything talks to a frozen sandbox or kills it: a frozen
        stub reads no claim line and no EOF, and a frozen task does not even
        die of SIGKILL until thawed. False when the kernel refused (the
        sandbox is then useless: the caller discards it)."""
        if not self.frozen:
            return True
        try:
            self.cgroup.thaw()
        except OSError as e:
            log.warning("thaw_failed", container_id=self.container_id, error=str(e))
            return False
        self.frozen = False
        return True

    async def stop_idle(self) -> None:
        """An unclaimed (pooled) sandbox: EOF on the stub's stdin ends it cleanly."""
        self.thaw()
        proc = self.process
        if proc is not None and proc.stdin is not None:
            try:
                await proc.stdin.aclose()
            except (anyio.BrokenResourceError, BrokenPipeError, OSError):
                pass
        if proc is not None:
            with anyio.move_on_after(self.host.config.kill_grace):
                async with anyio.create_task_group() as tg:
                    for stream in (proc.stdout, proc.stderr):
                        if not isinstance(stream, OutputFile):  # a file needs no draining
                            tg.start_soon(pump, stream, BoundedCapture(0))
                await proc.wait()
            if proc.returncode is None:
                await self.host.runsc.kill(self.container_id)
                await self.host.runsc.delete(self.container_id)
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        await self.teardown()

    async def teardown(self) -> None:
        """Remove runsc state, the cgroup and the bundle. Never raises; once."""
        if self._torn_down:
            return
        self._torn_down = True
        cid, runsc = self.container_id, self.host.runsc
        self.thaw()  # a frozen sandbox would not die of `runsc delete`'s SIGKILL
        try:
            self.close_watch()
            if self.launched is not None:
                self.launched.close_config()
            proc = self.process
            if proc is not None:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        await stream.aclose()
                if proc.returncode is None:
                    with anyio.move_on_after(self.host.config.kill_grace):
                        await proc.wait()
            if runsc.has_state(cid):
                await runsc.delete(cid)
                runsc.remove_state_files(cid)
            if self.net is not None:
                # After runsc: the listener closes first, then the namespaces.
                await self.net.aclose()
            left = await self.cgroup.remove()
            if left:
                for pid in runsc.process_pids(cid):
                    kill_pid(pid)
                left = await self.cgroup.remove()
            if left:
                log.warning("cgroup_left", container_id=cid, paths=[str(p) for p in left])
            # In a worker thread: removing the (nearly empty) bundle took
            # 20-90 ms on this host's ext4 under load, which in the event
            # loop delayed every other call's answer (a warm call's most).
            await anyio.to_thread.run_sync(shutil.rmtree, self.bundle, True)
        except Exception as e:  # teardown must not mask the result
            log.error("teardown_failed", container_id=cid, error=repr(e))


def mountpoints_of(options: ContainerOptions) -> tuple[str, ...]:
    """What a run's empty root must have directories for (spares are kept per set)."""
    return (*(m.destination for m in options.extra_mounts), options.workdir)


def spare_shape(host: Host, options: ContainerOptions) -> str | None:
    """The shape of a started spare (spares.py) a cold run with `options` can
    take, or None. A started spare's runsc command line is fixed when it is
    started, all but its limits and stdin: so the built-in root, its network
    mode (the shape; network=sandbox when there is a provider to prepare
    its namespace ahead, as for a pooled sandbox), output files, and a
    launcher whose steps do not depend on the run (not report_memory_limit:
    MemTotal is the run's own limit)."""
    config = host.config
    if options.rootfs is not None or (options.network is NetworkMode.SANDBOX and host.network is None):
        return None
    if not config.spare_launchers or not config.cgroup_prejoin or config.report_memory_limit or not host.output_files:
        return None
    if not (accepts_skips(options.stdout_writer) and accepts_skips(options.stderr_writer)):
        return None
    return options.network.value


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
