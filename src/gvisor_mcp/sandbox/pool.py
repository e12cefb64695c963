"""Warm pool: sandboxes booted ahead of time, each handed out exactly once.

A pooled sandbox is a normal foreground `runsc run` whose init process is a
tiny shell stub (stub.py): given its exit mark at boot, it forks the process
that will run the command, which waits on stdin for one line. Claiming the
sandbox writes that line (`cd WORKDIR`, exactly the environment a cold run
would have, `exec ARGV`); the rest of stdin is the command's, and the stub
reports the exit status with the mark. Limits are written into the
sandbox's cgroup at claim time (we own it), and its peak-memory counter is
reset, so a warm hit enforces and reports what a cold run does. What cannot
change after boot — image, mounts, user, network, process limit — is the
pool key: a request whose key has no ready sandbox, nor one booting that
no other run has taken, takes the cold path.

Never reused: after its command exits the sandbox is gone, like a cold one.
Its replacement starts booting when the claimed command is answered, or
REFILL_DELAY after the claim (REFILL_DELAY_SPARE while another sandbox for
its key is ready).

A request that finds no ready sandbox but one still booting for its key
takes that boot (`WarmPool.reserve`) rather than booting a cold sandbox of
its own beside it (back-to-back calls outran the refill, and each miss then
paid a whole cold boot on CPUs the refill was using). From the moment it
takes it, the run is in the Manager's active runs with that sandbox's
container id and holds its own capacity slot (the boot stops counting as
the pool's, so the keeper starts the next one when capacity allows); kill
and cancel end the wait; the result's boot_duration counts the wait.

A ready sandbox that no run claimed for `ManagerConfig.pool_freeze_after`
seconds is frozen (cgroup freezer): this runsc's systrap sentry polls
~40-60 ms of CPU per second while it idles, none frozen. Whatever takes a
sandbox out of the ready list thaws it before talking to it: the claim
(PoolKeeper.claim; a sandbox that will not thaw is discarded and the call goes
on as a miss), its stop (Container.stop_idle, teardown), the stale reaper.
A dead server's frozen sandboxes cannot read the EOF that would end them:
its thaw guard (thawguard.py, started with the first pooled sandbox) thaws them
once the server is gone, or, if it died too, the next start's reaper.

`WarmPool` is the bookkeeping (targets, ready sandboxes, hit counts);
`PoolKeeper` boots and destroys pooled sandboxes in the Manager's task group,
within the Manager's capacity.

Why over ~400 lines: the bookkeeping and the keeper share one set of
invariants (what counts as the pool's capacity: ready, booting, taken,
held; which sandbox may be frozen, and when it must be thawed), read
together whenever either changes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from .cgroups import freezer_available
from .container import Container
from .errors import SandboxError
from .host import Host
from .options import ContainerOptions, ResourceSpec
from .outfile import OutputFile
from .spec import DEFAULT_ENV
from .stub import EXIT_MARK, STUB_COMMAND, boot_line

log = structlog.get_logger("gvisor_mcp.sandbox")

PoolKey = tuple[Any, ...]

REFILL_DELAY = 0.25
"""Seconds after a claim before its replacement starts booting, unless the
claimed command is answered sooner. A refill started at the claim spent its
synchronous part (root dir, spec, cgroup, fork/exec of runsc: a few ms, tens
under load) in the event loop between the claim line and the command, and
its boot then shared the 2 CPUs with the command it was claimed for (a
claimed warm `true` ran ~40 ms slower that way here). Short commands get the
CPUs to themselves; a long one does not leave the pool empty for long."""

REFILL_DELAY_SPARE = 2.0
"""REFILL_DELAY when the pool still holds a ready sandbox for the claimed
one's key: the next call is served either way, so the replacement's boot
(~200 ms of CPU here) waits for a command of up to this many seconds
instead of sharing the CPUs with it (a 100 MB flood through a pool of 2:
1041 against 1147 ms with the refill booting beside it, n=8)."""


def pool_key(options: ContainerOptions, res: ResourceSpec) -> PoolKey | None:
    """What a pooled sandbox must match; None when the request cannot be pooled.

    Any image can be pooled; its directory is part of the key, and a store
    image's directory is named after its content digest, so a rebuilt image
    (a new digest) never gets a sandbox booted from the old one. The stub
    needs /bin/sh in the image (a pool for an image without one never fills:
    its runs go cold). A first argument containing '=' would be read by env
    as an assignment.
    """
    if "=" in options.command[0]:
        return None
    return (
        options.rootfs,
        options.network.value,
        (options.user.uid, options.user.gid) if options.user else None,
        options.read_only_rootfs,
        tuple(m.model_dump_json() for m in options.extra_mounts),
        res.max_pids,
    )


@dataclass
class WarmSandbox:
    container: Container
    key: PoolKey
    booted_at: float = field(default_factory=time.monotonic)
    env_keys: tuple[str, ...] = ()
    """The variables the stub was started with (its spec's environment)."""

    @property
    def container_id(self) -> str:
        return self.container.container_id


@dataclass
class Boot:
    """A pooled sandbox still booting. A run that missed may take it
    (`WarmPool.reserve`): the keeper then hands the sandbox to that run
    (`given`, once `settled`) instead of the ready list."""

    container: Container
    key: PoolKey
    taken: bool = False
    abandoned: bool = False
    """Taken, then given up by its run (killed, cancelled, timed out while
    waiting): the keeper stops it once booted."""
    given: WarmSandbox | None = None
    settled: anyio.Event = field(default_factory=anyio.Event)
    """Set once the boot is over: `given` is the sandbox, or None (failed)."""


@dataclass
class PoolTarget:
    template: ContainerOptions
    size: int


class WarmPool:
    """Bookkeeping only; booting and destroying is the PoolKeeper's job."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.targets: dict[PoolKey, PoolTarget] = {}
        self.ready: dict[PoolKey, list[WarmSandbox]] = {}
        self.boots: dict[PoolKey, list[Boot]] = {}
        """Boots in progress that no run has taken (taken ones count as
        their run's capacity, not the pool's)."""
        self.hits = 0
        self.misses = 0
        self.changed = anyio.Event()
        self.holds: dict[PoolKey, list[object]] = {}
        """Per key, one entry per claimed sandbox whose replacement must not
        boot yet (REFILL_DELAY): the keeper counts them as if booting."""

    def wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def set_target(self, key: PoolKey, template: ContainerOptions, size: int) -> None:
        """Keep `size` sandboxes ready for `key`; 0 stops it."""
        if size <= 0:
            self.targets.pop(key, None)
        else:
            self.targets[key] = PoolTarget(template=template, size=size)
        self.wake()

    async def wait_full(self, key: PoolKey | None, timeout: float) -> bool:
        """Wait until `key`'s target is met; False on timeout or without a target."""
        if key is None:
            return False
        with anyio.move_on_after(timeout):
            while True:
                target = self.targets.get(key)
                if target is None or len(self.ready.get(key, [])) >= target.size:
                    return target is not None
                await self.changed.wait()
        return False

    def claim(self, key: PoolKey | None) -> WarmSandbox | None:
        if key is None or key not in self.targets:
            return None
        ready = self.ready.get(key, [])
        now = time.monotonic()
        while ready:
            warm = ready.pop()  # newest first
            if now - warm.booted_at <= self.max_age:
                # No wake(): the refill waits for the claimed command (see
                # REFILL_DELAY); the Manager wakes the keeper.
                self.hits += 1
                return warm
            ready.insert(0, warm)  # expired: left for the maintainer
            break
        self.misses += 1
        self.wake()
        return None

    def hold(self, key: PoolKey) -> object:
        """Defer the replacement of a sandbox just claimed for `key` until
        `release(key, token)`; REFILL_DELAY says why, Manager._refill_after
        when. Taken at the claim itself: the keeper looks at least once a
        second, and must not boot the replacement before the hold exists."""
        token = object()
        self.holds.setdefault(key, []).append(token)
        return token

    def release(self, key: PoolKey, token: object) -> None:
        held = self.holds.get(key, [])
        if token in held:
            held.remove(token)
            if not held:
                del self.holds[key]
        self.wake()

    def held(self, key: PoolKey) -> int:
        return len(self.holds.get(key, ()))

    def unclaim(self, warm: WarmSandbox) -> None:
        """The claimed `warm` cannot be used (it would not thaw): the claim
        counts as a miss, and the caller destroys it."""
        self.hits -= 1
        self.misses += 1
        self.wake()

    def reserve(self, key: PoolKey | None) -> Boot | None:
        """After a miss: the oldest boot in progress for `key` that no run
        has taken, now taken by the caller (None: there is none)."""
        if key is None or key not in self.targets:
            return None
        boots = [b for b in self.boots.get(key, []) if not b.abandoned]
        if not boots:
            return None
        boot = boots[0]
        self.boots[key].remove(boot)
        boot.taken = True
        self.hits += 1
        self.misses -= 1  # claim() counted it; it is served by the pool after all
        self.wake()  # its place in the pool is free: the keeper may boot another
        return boot

    def abandon(self, boot: Boot) -> WarmSandbox | None:
        """The run that took `boot` no longer wants it. A boot still going
        on counts as the pool's again until the keeper has stopped it; a
        sandbox already handed over is returned, for the caller to destroy."""
        boot.abandoned = True
        if not boot.settled.is_set():
            self.boots.setdefault(boot.key, []).append(boot)
        given, boot.given = boot.given, None
        return given

    def idle(self) -> int:
        return sum(len(v) for v in self.ready.values())

    def frozen(self) -> int:
        """Pooled sandboxes frozen now (the metrics gauge). Only a ready one is
        ever frozen, and whatever takes one out of the ready list thaws it
        (claim, stop_idle, teardown): counting the ready list is enough."""
        return sum(w.container.frozen for ws in self.ready.values() for w in ws)

    def booting(self, key: PoolKey) -> int:
        return sum(not b.abandoned for b in self.boots.get(key, []))

    def in_flight(self) -> int:
        return self.idle() + sum(len(v) for v in self.boots.values())

    def container_ids(self) -> set[str]:
        return {w.container_id for v in self.ready.values() for w in v}

    def expired(self) -> list[WarmSandbox]:
        """Idle sandboxes to destroy: too old, or of a shape no target wants any
        more (the server's default request changed, or its image was rebuilt:
        an image no run will claim must not stay in use)."""
        now = time.monotonic()
        out = []
        for key, ready in self.ready.items():
            wanted = key in self.targets
            keep = [w for w in ready if wanted and now - w.booted_at <= self.max_age]
            out += [w for w in ready if w not in keep]
            self.ready[key] = keep
        return out

    def take_oldest(self) -> WarmSandbox | None:
        """Evict one idle sandbox (to make room for a cold run)."""
        best: WarmSandbox | None = None
        for ready in self.ready.values():
            for w in ready:
                if best is None or w.booted_at < best.booted_at:
                    best = w
        if best is not None:
            self.ready[best.key].remove(best)
        return best

    def take_all(self) -> list[WarmSandbox]:
        out = [w for v in self.ready.values() for w in v]
        self.ready.clear()
        return out


class PoolKeeper:
    """Keeps every target's sandboxes booted, recycles expired ones, and
    evicts idle ones when a cold run needs their capacity.

    `used()` counts the capacity the Manager's runs hold (running, or still
    tearing down after an early answer); pooled sandboxes come on top.
    """

    def __init__(self, pool: WarmPool, host: Host, used: Callable[[], int], closed: Callable[[], bool]) -> None:
        self.pool = pool
        self.host = host
        self._used = used
        self._closed = closed
        self.booting_ids: set[str] = set()
        self.freeze_after = host.config.pool_freeze_after if freezer_available(host.cgroup_version) else 0.0
        """0: never freeze (turned off, or no freezer here)."""

    @property
    def capacity(self) -> int:
        return self.host.config.max_concurrent_containers

    def make_room(self) -> None:
        """A cold run is starting: keep runs + pooled sandboxes within capacity."""
        while self._used() + 1 + self.pool.in_flight() > self.capacity and self.pool.idle():
            warm = self.pool.take_oldest()
            if warm is None:
                break
            self.host.tg.start_soon(self.destroy, warm)

    async def maintain(self) -> None:
        while not self._closed():
            for warm in self.pool.expired():
                self.host.tg.start_soon(self.destroy, warm)
            for key, target in list(self.pool.targets.items()):
                have = len(self.pool.ready.get(key, [])) + self.pool.booting(key) + self.pool.held(key)
                for _ in range(target.size - have):
                    if self._used() + self.pool.in_flight() >= self.capacity:
                        break
                    c = Container(self.host, self.host.new_container_id(), freezable=self.freeze_after > 0)
                    boot = Boot(c, key)
                    self.booting_ids.add(boot.container.container_id)
                    self.pool.boots.setdefault(key, []).append(boot)
                    self.host.tg.start_soon(self._boot, boot, target.template)
            with anyio.move_on_after(1.0):
                await self.pool.changed.wait()

    async def _boot(self, boot: Boot, template: ContainerOptions) -> None:
        host, key, c = self.host, boot.key, boot.container
        cid = c.container_id
        pooled = False
        if self.freeze_after > 0:
            # Started with the first pooled sandbox rather than at its first
            # freeze: a server's processes and fds do not change once its pool
            # is up (the soak counts them); _freeze_later checks it again.
            try:
                await host.thaw_guard.ensure()
            except OSError as e:
                log.warning("thaw_guard_failed", error=str(e))
        try:
            res = template.resources.merged_over(host.config.default_resources)
            # stdout a file (outfile.py), as a cold run's; stderr stays a
            # pipe: the stub's exit status on it ends the stdout file too.
            await c.start(template, res, command=STUB_COMMAND, stdin=True, stdout_file=host.output_files)
            watch, proc = c.watch, c.process
            assert watch is not None and proc is not None and proc.stdin is not None
            c.exit_mark = EXIT_MARK.format(nonce=secrets.token_hex(16))
            await proc.stdin.send(boot_line(c.exit_mark))
            with anyio.move_on_after(host.config.boot_timeout):
                async with anyio.create_task_group() as tg:

                    async def exited() -> None:
                        await proc.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(exited)
                    await watch.wait()
                    tg.cancel_scope.cancel()
            if self._closed() or boot.abandoned or not (boot.taken or key in self.pool.targets):
                return  # no longer wanted: the finally clause stops it
            if watch.running_at is None or proc.returncode is not None:
                raise SandboxError("pooled sandbox did not boot in time")
            if isinstance(proc.stdout, OutputFile):
                # Booted: the sentry has imported stdout without O_APPEND (no
                # fstat per write); from now on Linux appends whatever it writes.
                proc.stdout.set_append()
            c.close_watch()
            warm = WarmSandbox(
                container=c,
                key=key,
                env_keys=tuple({**DEFAULT_ENV, **(template.env or {}), **(c.net.env if c.net else {})}),
            )
            if boot.taken:
                boot.given = warm  # the run waiting for it claims it
            else:
                self.pool.ready.setdefault(key, []).append(warm)
                if self.freeze_after > 0:
                    self.host.tg.start_soon(self._freeze_later, warm)
            pooled = True
        except Exception as e:
            log.warning("pool_boot_failed", container_id=cid, error=str(e))
            if not boot.taken:  # a run waiting for it goes cold at once
                await anyio.sleep(1.0)  # do not spin on a persistent failure
        finally:
            if not pooled:
                with anyio.CancelScope(shield=True):
                    await c.stop_idle()
            boots = self.pool.boots.get(key, [])
            if boot in boots:
                boots.remove(boot)
            self.booting_ids.discard(cid)
            boot.settled.set()
            self.pool.wake()

    def claim(self, key: PoolKey | None) -> WarmSandbox | None:
        """WarmPool.claim, thawed (Manager.run claims before it writes the
        claim line). One that will not thaw is destroyed, and the claim
        counts as a miss: the run goes on as a miss does."""
        warm = self.pool.claim(key)
        if warm is not None and not warm.container.thaw():
            self.pool.unclaim(warm)
            self.host.tg.start_soon(self.destroy, warm)
            return None
        return warm

    async def _freeze_later(self, warm: WarmSandbox) -> None:
        """Freeze `warm` once it has idled `freeze_after` seconds. The check
        and the write happen in one turn of the event loop, as the claim's
        pop and thaw do: a claimed sandbox is never frozen behind its run."""
        await anyio.sleep(self.freeze_after)
        try:
            await self.host.thaw_guard.ensure()  # thaws them if this server dies (thawguard.py)
        except OSError as e:
            log.warning("freeze_skipped", container_id=warm.container_id, error=f"no thaw guard: {e}")
            return
        idle = not self._closed() and any(w is warm for w in self.pool.ready.get(warm.key, []))
        if idle:
            warm.container.freeze()

    async def destroy(self, warm: WarmSandbox) -> None:
        with anyio.CancelScope(shield=True):
            await warm.container.stop_idle()
