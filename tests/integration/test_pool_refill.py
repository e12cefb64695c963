"""When a claimed pooled sandbox's replacement starts booting
(sandbox/pool.py, REFILL_DELAY and REFILL_DELAY_SPARE), with real runsc:
while another sandbox for the key is ready, the refill waits for the
claimed command (up to REFILL_DELAY_SPARE) instead of booting beside it;
with none left, it starts REFILL_DELAY after the claim."""

from __future__ import annotations

import time

import anyio
import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Manager
from gvisor_mcp.sandbox.pool import REFILL_DELAY, REFILL_DELAY_SPARE

from ..conftest import leftovers
from .conftest import make_config

pytestmark = pytest.mark.runsc

TRUE = ContainerOptions(command=["true"])


def _booting(m: Manager) -> int:
    return sum(len(b) for b in m.pool.boots.values())


async def _claimed_run(m: Manager, seconds: float, watch: float) -> tuple[list[tuple[float, int, int]], object]:
    """Run `sleep seconds` through the pool; while it runs, sample (time
    since the claim, boots in progress, ready sandboxes) for `watch` s."""
    samples: list[tuple[float, int, int]] = []
    result = None

    async def call() -> None:
        nonlocal result
        result = await m.run(ContainerOptions(command=["sleep", str(seconds)]), run_id="r1")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(30):
            while m.active_run("r1") is None:
                await anyio.sleep(0.002)
        t0 = time.monotonic()
        while (dt := time.monotonic() - t0) < watch:
            samples.append((dt, _booting(m), m.idle_pooled()))
            await anyio.sleep(0.02)
    return samples, result


async def test_with_a_sandbox_still_ready_the_refill_waits_for_the_claimed_command(sandbox_base):
    assert REFILL_DELAY_SPARE >= 1.5 > REFILL_DELAY
    async with Manager(make_config(sandbox_base, max_concurrent_containers=4)) as m:
        m.warm(TRUE, 2)
        assert await m.wait_warm(TRUE, 60)
        samples, result = await _claimed_run(m, 1.5, watch=1.2)
        # One sandbox stayed ready all along, and nothing booted beside the command.
        assert [s for s in samples if s[1:] != (0, 1)] == []
        # Once it is answered the pool fills up again.
        assert await m.wait_warm(TRUE, 60)
        m.warm(TRUE, 0)
    assert result.status == ContainerStatus.EXITED and result.exit_code == 0 and result.warm, result.summary()
    assert leftovers(sandbox_base) == {}


async def test_with_none_left_the_refill_starts_during_the_claimed_command(sandbox_base):
    async with Manager(make_config(sandbox_base, max_concurrent_containers=4)) as m:
        m.warm(TRUE, 1)
        assert await m.wait_warm(TRUE, 60)
        samples, result = await _claimed_run(m, 3, watch=2.5)
        # The replacement started (booting, or already ready) while `sleep 3` ran.
        assert any(booting or ready for _, booting, ready in samples), samples
        m.warm(TRUE, 0)
    assert result.status == ContainerStatus.EXITED and result.exit_code == 0 and result.warm, result.summary()
    assert leftovers(sandbox_base) == {}
