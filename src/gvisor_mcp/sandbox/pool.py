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
pool key: a request whose key has no ready sandbox takes the cold path.

Never reused: after its command exits the sandbox is gone, like a cold one.
Its replacement starts booting when the claimed command is answered, or
REFILL_DELAY after the claim.

`WarmPool` is the bookkeeping (targets, ready sandboxes, hit counts);
`PoolKeeper` boots and destroys pooled sandboxes in the Manager's task group,
within the Manager's capacity.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from .container import Container
from .errors import SandboxError
from .host import Host
from .options import ContainerOptions, ResourceSpec
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
class PoolTarget:
    template: ContainerOptions
    size: int


class WarmPool:
    """Bookkeeping only; booting and destroying is the PoolKeeper's job."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.targets: dict[PoolKey, PoolTarget] = {}
        self.ready: dict[PoolKey, list[WarmSandbox]] = {}
        self.booting: dict[PoolKey, int] = {}
        self.hits = 0
        self.misses = 0
        self.changed = anyio.Event()

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

    def idle(self) -> int:
        return sum(len(v) for v in self.ready.values())

    def in_flight(self) -> int:
        return self.idle() + sum(self.booting.values())

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
                have = len(self.pool.ready.get(key, [])) + self.pool.booting.get(key, 0)
                for _ in range(target.size - have):
                    if self._used() + self.pool.in_flight() >= self.capacity:
                        break
                    self.pool.booting[key] = self.pool.booting.get(key, 0) + 1
                    self.host.tg.start_soon(self._boot, key, target.template)
            with anyio.move_on_after(1.0):
                await self.pool.changed.wait()

    async def _boot(self, key: PoolKey, template: ContainerOptions) -> None:
        host = self.host
        cid = host.new_container_id()
        self.booting_ids.add(cid)
        c = Container(host, cid)
        pooled = False
        try:
            res = template.resources.merged_over(host.config.default_resources)
            await c.start(template, res, command=STUB_COMMAND, stdin=True)
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
            if self._closed() or key not in self.pool.targets:
                return  # no longer wanted: the finally clause stops it
            if watch.running_at is None or proc.returncode is not None:
                raise SandboxError("pooled sandbox did not boot in time")
            c.close_watch()
            self.pool.ready.setdefault(key, []).append(
                WarmSandbox(
                    container=c,
                    key=key,
                    env_keys=tuple({**DEFAULT_ENV, **(template.env or {}), **(c.net.env if c.net else {})}),
                )
            )
            pooled = True
        except Exception as e:
            log.warning("pool_boot_failed", container_id=cid, error=str(e))
            await anyio.sleep(1.0)  # do not spin on a persistent failure
        finally:
            if not pooled:
                with anyio.CancelScope(shield=True):
                    await c.stop_idle()
            self.booting_ids.discard(cid)
            self.pool.booting[key] -= 1
            self.pool.wake()

    async def destroy(self, warm: WarmSandbox) -> None:
        with anyio.CancelScope(shield=True):
            await warm.container.stop_idle()
