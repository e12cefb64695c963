"""FairGate: slots go round-robin across tenants, never above capacity."""

from __future__ import annotations

import anyio
import pytest

from gvisor_mcp.jobs import FairGate


async def test_a_tenant_with_a_backlog_does_not_starve_another():
    gate = FairGate(2)
    order: list[str] = []
    release = anyio.Event()

    async def run(tenant: str) -> None:
        await gate.acquire(tenant)
        order.append(tenant)
        assert gate.used <= gate.capacity
        await release.wait()
        gate.release(tenant)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(run, "a")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(run, "b")
        await anyio.wait_all_tasks_blocked()
        assert order == ["a", "a"] and gate.waiting() == 5
        release.set()
    # b went in with the first freed slot, not after a's whole backlog.
    assert order[2] == "b", order
    assert gate.used == 0 and gate.waiting() == 0


async def test_cancelled_waiters_leave_no_trace_and_handed_slots_come_back():
    gate = FairGate(1)
    await gate.acquire("a")
    with anyio.move_on_after(0.05):
        await gate.acquire("b")
    assert gate.waiting() == 0 and gate.used == 1
    gate.release("a")
    assert gate.used == 0
    await gate.acquire("a")  # free again: no queue, immediate


@pytest.mark.parametrize("n", [1, 3, 8])
async def test_never_above_capacity(n):
    gate = FairGate(n)
    peak = 0

    async def run(tenant: str) -> None:
        nonlocal peak
        await gate.acquire(tenant)
        peak = max(peak, gate.used)
        await anyio.sleep(0)
        gate.release(tenant)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(run, "abc"[i % 3])
    assert peak <= n and gate.used == 0
