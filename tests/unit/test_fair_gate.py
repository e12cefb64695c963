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


@pytest.mark.parametrize("reserve", [0, 1])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
async def test_never_above_capacity_and_every_waiter_served(n, reserve):
    gate = FairGate(n, reserve=reserve)
    peak = 0

    async def run(tenant: str) -> None:
        nonlocal peak
        await gate.acquire(tenant)
        peak = max(peak, gate.used)
        await anyio.sleep(0.001 * reserve)
        gate.release(tenant)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(run, "aab c"[i % 5])
    assert peak <= n and gate.used == 0 and gate.waiting() == 0 and gate.held == {}


# --- the reserve: a slot kept for a tenant below its fair share -------------------------------


async def test_a_tenant_alone_leaves_the_reserved_slot_free_for_a_newcomer():
    """Issue 14: capacity 4, tenant a's quota 4, long commands. Without the
    reserve a held all 4 slots and b waited for one of them to END."""
    gate = FairGate(4, reserve=1)
    done = anyio.Event()
    order: list[str] = []

    async def run(tenant: str) -> None:
        await gate.acquire(tenant)
        order.append(tenant)
        await done.wait()
        gate.release(tenant)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(run, "a")
        await anyio.wait_all_tasks_blocked()
        assert gate.held == {"a": 3} and gate.waiting() == 1  # the 4th waits: the slot is kept
        with anyio.fail_after(5):
            await gate.acquire("b")  # at once: no slot of a's had to end
        assert gate.held == {"a": 3, "b": 1} and gate.used == 4
        gate.release("b")
        # Freed by b; a (3 held, above its share of 4/2) still may not take the kept slot.
        assert gate.held == {"a": 3} and gate.waiting() == 1
        done.set()
    assert gate.used == 0 and gate.waiting() == 0 and order == ["a"] * 4


async def test_a_waiting_tenant_below_its_share_goes_first_and_the_other_gets_the_rest():
    gate = FairGate(4, reserve=1)
    for _ in range(3):
        await gate.acquire("a")
    got: list[str] = []

    async def want(tenant: str) -> None:
        await gate.acquire(tenant)
        got.append(tenant)

    async with anyio.create_task_group() as tg:
        tg.start_soon(want, "a")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(want, "b")
        tg.start_soon(want, "b")
        await anyio.wait_all_tasks_blocked()
        assert got == ["b"]  # the kept slot, at once
        gate.release("a")  # a: 2 held = its share; b: 1 held, below: b's second goes
        await anyio.wait_all_tasks_blocked()
        assert got == ["b", "b"]
        gate.release("b")
        gate.release("b")  # 2 free, more than the reserve: a may take one again
        await anyio.wait_all_tasks_blocked()
        assert got == ["b", "b", "a"]
    assert gate.held == {"a": 3}


async def test_without_a_reserve_a_lone_tenant_uses_every_slot():
    gate = FairGate(4)
    for _ in range(4):
        with anyio.fail_after(5):
            await gate.acquire("a")
    assert gate.used == 4
