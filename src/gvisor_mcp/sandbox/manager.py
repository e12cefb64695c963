"""How a run works: one fresh gVisor sandbox per call, created and destroyed
inside `Manager.run`.

Per run: a fresh container id; a bundle directory (config.json, an empty
per-run root for the default image); a cgroup leaf we create and fill with
limits; a foreground `runsc run`; output pumped into bounded captures; a
watchdog for the deadline; then counters read from the cgroup and everything
removed: runsc state, cgroup, bundle (container.py). A warm run claims a
sandbox the pool booted ahead instead (pool.py, stub.py).

The Manager admits runs (capacity, ids, closing), keeps the registry of runs
in flight, and owns the host resources (host.py) for its `async with`.

Ownership: every Manager holds an exclusive flock on its own owner file for
its lifetime. Container ids embed the Manager's instance id, so
`cleanup_stale` can tell a live neighbour's runs (lock held: never touched)
from a dead process's leftovers (lock free: reaped; reaper.py).

Why over ~400 lines: admission, the registry of runs in flight and the
warm hand-offs (claim, reserve, refill, early answer) share the capacity
slots, and are read together whenever one of them changes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import anyio

from .config import ManagerConfig
from .container import Container
from .errors import InvalidOptionsError, ManagerClosedError
from .host import Host
from .network import NetworkProvider
from .options import ContainerOptions, NetworkMode, ResourceSpec
from .pool import REFILL_DELAY, REFILL_DELAY_SPARE, Boot, PoolKeeper, PoolKey, WarmPool, WarmSandbox, pool_key
from .reaper import reap_stale
from .result import ContainerResult, ContainerStatus
from .spec import check_workdir


class _Waiting:
    """A run waiting for the pooled sandbox booting for it (pool.Boot)."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.reason: ContainerStatus | None = None

    def stop(self, reason: ContainerStatus) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()


@dataclass(frozen=True)
class _Entered:
    host: Host
    keeper: PoolKeeper


class Manager:
    """Runs commands, each in a fresh gVisor sandbox. Safe for concurrent use.

    Use it as `async with Manager(config) as manager:`. Entering checks the
    host (runsc, cgroups), takes the owner lock and starts the warm pool's
    upkeep; leaving kills what still runs and removes it (`close`).
    """

    def __init__(self, config: ManagerConfig | None = None, *, network: NetworkProvider | None = None) -> None:
        """`network` prepares namespaces for network=sandbox runs (the server
        passes gvisor_mcp.network's NetworkService); without one, such runs
        are refused."""
        self.config = config or ManagerConfig()
        self.network = network
        self.pool = WarmPool(self.config.pool_max_age)
        self._limiter = anyio.CapacityLimiter(self.config.max_concurrent_containers)
        self._active: dict[str, Container] = {}
        self._tearing: set[str] = set()
        """Sandboxes whose run already returned, still exiting (warm early answers)."""
        self._waiting: dict[str, _Waiting] = {}
        """Runs (by run_id) waiting for a pooled sandbox still booting (pool.Boot)."""
        self._closed = False
        self._close_done: anyio.Event | None = None
        self._lifetime: AbstractAsyncContextManager[Manager] | None = None
        self._parts: _Entered | None = None

    async def __aenter__(self) -> Manager:
        if self._lifetime is not None or self._closed:
            raise RuntimeError("a Manager is entered once: make a new one")
        self._lifetime = self._live()
        return await self._lifetime.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _live(self) -> AsyncIterator[Manager]:
        host = Host(self.config, self.network)  # raises before anything starts when the host cannot run sandboxes
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            host.tg = tg
            keeper = PoolKeeper(self.pool, host, self._used, lambda: self._closed)
            self._parts = _Entered(host, keeper)
            tg.start_soon(keeper.maintain)
            try:
                yield self
            except BaseException as e:
                # Re-raised below as itself, not wrapped in the task group's
                # ExceptionGroup: the caller's error is not ours.
                failure = e
            finally:
                await self.close()
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure

    @property
    def _entered(self) -> _Entered:
        if self._parts is None:
            raise RuntimeError("use the Manager inside `async with Manager(config) as manager:`")
        return self._parts

    # --- public API ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def instance(self) -> str:
        """The owner instance every container id of this Manager embeds."""
        return self._entered.host.instance

    def active_containers(self) -> int:
        """The number of containers currently running."""
        return len(self._active)

    def idle_pooled(self) -> int:
        """Warm sandboxes booted and waiting for a claim."""
        return self.pool.idle()

    def frozen_pooled(self) -> int:
        """Pooled sandboxes frozen now (WarmPool.frozen)."""
        return self.pool.frozen()

    def active_runs(self) -> list[Container]:
        return list(self._active.values())

    def active_run(self, run_id: str) -> Container | None:
        return self._active.get(run_id)

    def new_container_id(self) -> str:
        """A fresh id embedding this Manager's instance (cleanup_stale relies on it)."""
        return self._entered.host.new_container_id()

    def prepare(self, options: ContainerOptions) -> ResourceSpec:
        """Validate everything that can be checked before a container exists.

        Raises InvalidOptionsError; returns the effective resources.
        """
        options.validate()
        check_workdir(options)
        if options.network is NetworkMode.SANDBOX and self.network is None:
            raise InvalidOptionsError(
                "network",
                options.network.value,
                "'none' or 'host' here: this Manager has no network provider for "
                "gVisor's own network stack ('sandbox')",
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
        entered = self._entered
        res = self.prepare(options)
        if run_id is not None and run_id in self._active:
            raise InvalidOptionsError("run_id", run_id, "an id not already running")
        key = pool_key(options, res)
        slot = object()  # the borrower of one capacity token (may outlive this call)
        await self._limiter.acquire_on_behalf_of(slot)
        c: Container | None = None
        try:
            if self._closed:
                raise ManagerClosedError()
            if run_id is not None and run_id in self._active:  # taken while we waited
                raise InvalidOptionsError("run_id", run_id, "an id not already running")
            warm = entered.keeper.claim(key)  # thawed, before its claim line is written
            waited = 0.0
            boot = self.pool.reserve(key) if warm is None else None
            if boot is not None:
                t = time.monotonic()
                warm, stopped = await self._take_boot(boot, run_id, options.command, res, slot)
                waited = time.monotonic() - t
                if stopped is not None:
                    return _never_ran(boot.container, stopped, waited)
            if warm is None:
                entered.keeper.make_room()
                c = await Container.cold(entered.host, options)
            else:
                c = warm.container
                delay = REFILL_DELAY_SPARE if self.pool.ready.get(warm.key) else REFILL_DELAY
                entered.host.tg.start_soon(self._refill_after, c, warm.key, self.pool.hold(warm.key), delay)
            rid = run_id or c.container_id
            c.begin(rid, options.command, res, warm=warm is not None, slot=slot, waited=waited)
            self._active[rid] = c
            try:
                try:
                    return await c.execute(options, res, warm.env_keys if warm else None)
                finally:
                    await self._after(c)
            finally:
                del self._active[rid]
                c.done.set()
                self.pool.wake()
        finally:
            if c is None or not c.answered_early:
                self._limiter.release_on_behalf_of(slot)

    def warm(self, template: ContainerOptions, size: int) -> None:
        """Keep `size` sandboxes booted for requests shaped like `template`
        (same image, network, user, mounts, process limit); 0 stops it.
        Takes effect inside `async with manager`."""
        res = self.prepare(template)
        key = pool_key(template, res)
        if key is None:
            raise InvalidOptionsError("template", template.command, "a command whose first argument has no '='")
        self.pool.set_target(key, template, size)

    async def wait_warm(self, template: ContainerOptions, timeout: float = 30.0) -> bool:
        """Wait until the pool for `template` is full (tests and benchmarks)."""
        return await self.pool.wait_full(pool_key(template, self.prepare(template)), timeout)

    async def kill(self, run_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        """Kill a running run (by run_id); its run() returns with `reason` as status."""
        c = self._active.get(run_id)
        if c is None:
            return False
        waiting = self._waiting.get(run_id)
        if waiting is not None:  # its sandbox is not its own yet: end the wait
            waiting.stop(reason)
            return True
        await c.terminate(reason)
        return True

    async def close(self) -> None:
        """Stop accepting runs, kill in-flight ones, wait close_grace, force-delete.

        Idempotent; concurrent callers all return once shutdown finished.
        Leaving `async with` calls it.
        """
        if self._closed:
            if self._close_done is not None:
                await self._close_done.wait()
            return
        self._closed = True
        self._close_done = anyio.Event()
        try:
            for waiting in self._waiting.values():
                waiting.stop(ContainerStatus.KILLED)
            runs = [c for rid, c in self._active.items() if rid not in self._waiting]
            self.pool.targets.clear()
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for c in runs:
                        tg.start_soon(c.terminate, ContainerStatus.KILLED)
                    for warm in self.pool.take_all():
                        tg.start_soon(warm.container.stop_idle)
                with anyio.move_on_after(self.config.close_grace):
                    for c in runs:
                        await c.done.wait()
                for c in runs:
                    if not c.done.is_set():
                        await c.force_delete()
                        if c.cancel_scope is not None:
                            c.cancel_scope.cancel()
                with anyio.move_on_after(self.config.kill_grace):
                    for c in runs:
                        await c.done.wait()
        finally:
            if self._parts is not None:
                with anyio.CancelScope(shield=True):
                    await self._parts.host.spares.close()
                    await self._parts.host.thaw_guard.aclose()
                self._parts.host.owner.release()
            self._close_done.set()

    async def cleanup_stale(self) -> int:
        """Remove leftovers no live Manager owns; return how many containers."""
        return len(await self.reap_stale())

    async def reap_stale(self) -> list[dict]:
        """Like cleanup_stale, with a report of what was removed per container
        (reaper.describe words one)."""
        return await reap_stale(self._entered.host, self._owned_ids)

    # --- internals ------------------------------------------------------------

    def _used(self) -> int:
        """Capacity held by runs: running, or still tearing down."""
        return len(self._active) + len(self._tearing)

    def _owned_ids(self) -> set[str]:
        return (
            {c.container_id for c in self._active.values()}
            | self.pool.container_ids()
            | self._entered.keeper.booting_ids
            | self._tearing
        )

    async def _after(self, c: Container) -> None:
        """A run returned or raised: remove its sandbox.

        After an early answer the command is done and reported, but the
        sandbox still has to exit (~50 ms): that finishes in the background
        and its capacity slot stays taken until it is gone. A cold run's
        started spare is replaced from here on (spares.py).
        """
        c.replace_spare()
        if c.answered_early:
            self._tearing.add(c.container_id)
            self._entered.host.tg.start_soon(self._teardown_later, c)
        else:
            with anyio.CancelScope(shield=True):
                await c.teardown()

    async def _take_boot(
        self, boot: Boot, run_id: str | None, command: tuple[str, ...], res: ResourceSpec, slot: object
    ) -> tuple[WarmSandbox | None, ContainerStatus | None]:
        """Wait for the pooled sandbox `boot` (pool.reserve gave it to this
        run) while showing the run as active, with that sandbox's container
        id, in its own capacity slot. Returns the booted sandbox (None: the
        boot failed, go cold) and, when the run was killed, timed out or the
        Manager closed during the wait, why (the sandbox is then given up)."""
        c = boot.container
        rid = run_id or c.container_id
        c.begin(rid, command, res, warm=True, slot=slot)
        waiting = self._waiting[rid] = _Waiting()
        self._active[rid] = c
        try:
            with waiting.scope:
                if res.timeout:
                    waiting.scope.deadline = anyio.current_time() + res.timeout
                await boot.settled.wait()
            if waiting.reason is None and waiting.scope.cancelled_caught:
                waiting.reason = ContainerStatus.TIMED_OUT  # a cold run's deadline covers its boot too
            if waiting.reason is None:
                return boot.given, None
            self._give_up(boot)
            return None, waiting.reason
        except BaseException:  # cancelled from outside
            self._give_up(boot)
            raise
        finally:
            del self._waiting[rid]
            del self._active[rid]

    def _give_up(self, boot: Boot) -> None:
        given = self.pool.abandon(boot)
        if given is not None:
            self._entered.host.tg.start_soon(self._entered.keeper.destroy, given)

    async def _refill_after(self, c: Container, key: PoolKey, hold: object, delay: float) -> None:
        """Let the pool keeper replace `c` once its command is answered, or
        after `delay`: REFILL_DELAY, or REFILL_DELAY_SPARE when the claim
        left a sandbox ready for `key` (pool.py says why not at the claim)."""
        try:
            with anyio.move_on_after(delay):
                await c.done.wait()
        finally:
            self.pool.release(key, hold)

    async def _teardown_later(self, c: Container) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await c.teardown()
            finally:
                self._tearing.discard(c.container_id)
                self._limiter.release_on_behalf_of(c.slot)
                self.pool.wake()


def _never_ran(c: Container, reason: ContainerStatus, waited: float) -> ContainerResult:
    """A run stopped while it waited for its pooled sandbox to boot: its
    command never started (exit code -1, no output)."""
    return ContainerResult(
        container_id=c.container_id,
        exit_code=-1,
        duration=waited,
        boot_duration=waited,
        status=reason,
        warm=False,
    )
