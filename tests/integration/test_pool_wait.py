"""A run that misses the warm pool while a sandbox is booting for its key
takes that boot (sandbox/pool.py, `WarmPool.reserve`), with real runsc:
while it waits it is an active run with the container id it is about to
get and holds a capacity slot; its result says warm and counts the wait in
boot_duration; kill, cancel and timeout end the wait and leave nothing."""

from __future__ import annotations

import anyio
import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Manager, ResourceSpec

from ..conftest import leftovers
from .conftest import make_config

pytestmark = pytest.mark.runsc

TRUE = ContainerOptions(command=["true"])


async def _until(predicate, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def _booting(m: Manager) -> None:
    """Wait until a pooled sandbox is booting and none is ready yet."""
    await _until(lambda: sum(len(b) for b in m.pool.boots.values()) > 0)
    assert m.idle_pooled() == 0


async def test_a_miss_waits_for_the_booting_sandbox_and_shows_it_while_it_waits(sandbox_base):
    seen: list[tuple[str, str, int]] = []
    async with Manager(make_config(sandbox_base, max_concurrent_containers=2)) as m:
        m.warm(TRUE, 1)
        await _booting(m)
        booting_id = m.pool.boots[next(iter(m.pool.boots))][0].container.container_id
        result = None

        async def call() -> None:
            nonlocal result
            result = await m.run(TRUE, run_id="r1")

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await _until(lambda: m.active_run("r1") is not None)
            run = m.active_run("r1")
            assert run is not None
            seen.append((run.run_id, run.container_id, m.active_containers()))
        m.warm(TRUE, 0)
    assert result is not None
    assert result.status == ContainerStatus.EXITED and result.exit_code == 0, result.summary()
    assert result.warm, result.summary()
    # Listed, while it waited, with the very container that then ran it, in a slot of its own.
    assert seen == [("r1", booting_id, 1)]
    assert result.container_id == booting_id
    # The wait is part of the call's boot time and duration.
    assert 0 < result.boot_duration <= result.duration
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("how", ["kill", "cancel"])
async def test_kill_or_cancel_while_waiting_ends_the_wait_and_leaves_nothing(sandbox_base, how):
    async with Manager(make_config(sandbox_base, max_concurrent_containers=2)) as m:
        m.warm(TRUE, 1)
        await _booting(m)
        result = None
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                nonlocal result
                result = await m.run(TRUE, run_id="r1")

            tg.start_soon(call)
            await _until(lambda: m.active_run("r1") is not None)
            if how == "kill":
                assert await m.kill("r1")
            else:
                tg.cancel_scope.cancel()
        assert m.active_run("r1") is None and m.active_containers() == 0
        if how == "kill":
            assert result is not None
            assert result.status == ContainerStatus.KILLED and result.exit_code == -1, result.summary()
            assert not result.warm and result.stdout == b""
        else:
            assert result is None
        # The pool goes on: a later call is served warm.
        assert await m.wait_warm(TRUE)
        again = await m.run(TRUE)
        assert again.warm and again.exit_code == 0, again.summary()
        m.warm(TRUE, 0)
    assert leftovers(sandbox_base) == {}


async def test_a_timeout_shorter_than_the_boot_times_out_while_waiting(sandbox_base):
    async with Manager(make_config(sandbox_base, max_concurrent_containers=2)) as m:
        m.warm(TRUE, 1)
        await _booting(m)
        r = await m.run(ContainerOptions(command=["true"], resources=ResourceSpec(timeout=0.001)))
        m.warm(TRUE, 0)
    # Either the boot was over within the timeout (then the command ran and
    # `true` outran its deadline or not), or the wait timed out: never a
    # result that claims the command ran when it did not.
    if r.status == ContainerStatus.TIMED_OUT and r.exit_code == -1:
        assert not r.warm and r.stdout == b""
    else:
        assert r.warm
    assert leftovers(sandbox_base) == {}


async def test_capacity_counts_the_waiting_run_not_also_its_boot(sandbox_base):
    # Capacity 1: the pool's one boot is taken by the run; the keeper must
    # not boot another sandbox beside it while the run holds the only slot.
    async with Manager(make_config(sandbox_base, max_concurrent_containers=1)) as m:
        m.warm(TRUE, 1)
        await _booting(m)
        async with anyio.create_task_group() as tg:
            tg.start_soon(m.run, TRUE)
            await _until(lambda: m.active_containers() == 1)
            for _ in range(20):  # while it waits, and runs
                assert m.pool.in_flight() + m.active_containers() <= 1
                await anyio.sleep(0.01)
        m.warm(TRUE, 0)
    assert leftovers(sandbox_base) == {}
