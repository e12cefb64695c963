"""The cluster's ledger (cluster/coordinator.py) without Ray: it is plain
asyncio, and the Ray actor is `ray.remote(Coordinator)`. What holds across
front ends is what holds here, since every front end asks this one object."""

from __future__ import annotations

import asyncio

import pytest

from gvisor_mcp.cluster.coordinator import Coordinator

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


HOSTS = {"a": 2, "b": 2}


async def test_quotas_count_every_front_end():
    c = Coordinator()
    first = await c.acquire("fe1", "carol", HOSTS, max_concurrent=1)
    assert "lease" in first
    other = await c.acquire("fe2", "carol", HOSTS, max_concurrent=1)
    assert "max_concurrent=1, counted across the cluster" in other["refused"]
    await c.release(first["lease"])
    assert "lease" in await c.acquire("fe2", "carol", HOSTS, max_concurrent=1)


async def test_a_release_carried_by_the_next_acquire_is_counted_first():
    """A front end releases off its answer path; the release may arrive after
    its next acquire, which carries it: the quota must not refuse that run,
    and a late duplicate release (or one of an unknown lease) changes nothing."""
    c = Coordinator()
    first = await c.acquire("fe1", "carol", HOSTS, max_concurrent=1)
    again = await c.acquire("fe1", "carol", HOSTS, max_concurrent=1, released=[first["lease"]])
    assert "lease" in again, again
    await c.release(first["lease"])  # the release itself, arriving late
    await c.release_many([first["lease"], "fe1:nothing:1"])
    assert (await c.snapshot())["held"] == {"carol": 1}
    assert "max_concurrent=1" in (await c.acquire("fe2", "carol", HOSTS, max_concurrent=1))["refused"]
    # Lease ids are not reused by a restarted coordinator (a stale carried id frees nothing).
    assert first["lease"] not in {(await Coordinator().acquire("fe1", "x", HOSTS))["lease"] for _ in range(3)}


async def test_runs_per_minute_count_every_front_end():
    c = Coordinator()
    for fe in ("fe1", "fe2"):
        assert "lease" in await c.acquire(fe, "dan", HOSTS, per_minute=2)
    assert "runs_per_minute=2" in (await c.acquire("fe3", "dan", HOSTS, per_minute=2))["refused"]


async def test_the_reserve_keeps_the_last_slot_for_a_tenant_below_its_share():
    c = Coordinator(reserve=1)
    # A tenant with a quota as large as the cluster, from two front ends: 3 of 4 slots.
    held = [await c.acquire(fe, "hog", HOSTS) for fe in ("fe1", "fe2", "fe1")]
    assert all("lease" in g for g in held)
    blocked = asyncio.create_task(c.acquire("fe2", "hog", HOSTS))
    await asyncio.sleep(0.05)
    assert not blocked.done()  # the last slot is not the hog's
    # Another tenant's call takes it at once, from either front end.
    small = await asyncio.wait_for(c.acquire("fe2", "small", HOSTS), 1)
    assert "lease" in small
    # Freed, it is the reserve again: the hog (3 held) still waits; one of its own ending lets it in.
    await c.release(small["lease"])
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await c.release(held[0]["lease"])
    assert "lease" in await asyncio.wait_for(blocked, 1)


async def test_a_freed_slot_goes_to_the_tenant_holding_fewest_across_front_ends():
    c = Coordinator()
    hosts = {"a": 2}
    leases = [await c.acquire("fe1", "hog", hosts) for _ in range(2)]
    hog_waits = asyncio.create_task(c.acquire("fe1", "hog", hosts))
    await asyncio.sleep(0.01)
    small_waits = asyncio.create_task(c.acquire("fe2", "small", hosts))
    await asyncio.sleep(0.01)
    await c.release(leases[0]["lease"])
    assert "lease" in await asyncio.wait_for(small_waits, 1)  # came later, holds fewer
    assert not hog_waits.done()
    await c.release(leases[1]["lease"])
    assert "lease" in await asyncio.wait_for(hog_waits, 1)


async def test_a_silent_front_end_loses_its_leases(monkeypatch):
    from gvisor_mcp.cluster import coordinator as mod

    c = Coordinator()
    assert "lease" in await c.acquire("dead", "t", {"a": 1})
    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    c.l.seen["dead"] = now[0]
    now[0] += mod.LEASE_TTL + 1
    await c.renew("alive", [])
    assert "lease" in await asyncio.wait_for(c.acquire("alive", "t", {"a": 1}), 1)


async def test_a_renew_that_crossed_a_grant_keeps_the_new_lease(monkeypatch):
    """Found by the two-front-end test under load: a renew listing the front
    end's leases as they were before a grant arrived after it, dropped the
    fresh lease, and another front end's run of the tenant got past its quota."""
    from gvisor_mcp.cluster import coordinator as mod

    c = Coordinator()
    fresh = await c.acquire("fe0", "carol", HOSTS, max_concurrent=1)
    await c.renew("fe0", [])  # taken before the grant was known
    assert "refused" in await c.acquire("fe1", "carol", HOSTS, max_concurrent=1)
    now = [mod.time.monotonic() + mod.RENEW_GRACE + 1]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    await c.renew("fe0", [])  # still not listed long after: released and its release lost
    assert "lease" in await c.acquire("fe1", "carol", HOSTS, max_concurrent=1)
    assert fresh["lease"] not in c.l.leases
