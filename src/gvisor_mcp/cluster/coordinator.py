"""The cluster's one shared ledger: capacity leases, fair share, quotas, workspace homes.

Every front end asks the coordinator for a lease before it sends a run to an
agent, so what holds on one host today holds across the cluster:

- capacity: a host never gets more leases than it reported slots;
- fair share: a freed slot goes to the waiting tenant holding the fewest
  leases cluster-wide (ties: who waited longest), and the last free slot of
  the cluster is kept for a tenant below its fair share (`reserve`), as
  `jobs.FairGate` does for one host;
- quotas: `max_concurrent` counts a tenant's leases and waiters on every
  front end; `runs_per_minute` counts its grants cluster-wide;
- affinity: a workspace (tenant-scoped, or one session's) is homed on the
  first host that gets a run for it, and every later run that mounts it
  waits for a slot there.

Leases belong to a front end. A front end renews all of its leases every
second (`renew`); one silent for LEASE_TTL seconds (crashed, partitioned)
loses them, so a dead front end does not hold capacity forever. `renew`
carries the full lease list, so a restarted coordinator (state lost) is
refilled within a second. Workspace homes and rate windows are not
rebuilt after a coordinator restart (docs/scale-out.md).

Pure asyncio, no Ray import: the Ray actor is `ray.remote(Coordinator)`.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from .priority import normal_priority

LEASE_TTL = 15.0
RENEW_GRACE = 10.0
"""A lease younger than this is never dropped by its front end's renew (see renew)."""


@dataclass
class Lease:
    lease_id: str
    frontend: str
    tenant: str
    host: str
    granted_at: float = field(default_factory=time.monotonic)


@dataclass
class Waiter:
    frontend: str
    tenant: str
    hosts: tuple[str, ...]
    future: asyncio.Future
    seq: int


@dataclass
class Ledger:
    capacity: dict[str, int] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)
    homes: dict[str, str] = field(default_factory=dict)
    recent: dict[str, deque] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)


class Coordinator:
    """`reserve`: as `jobs.FairGate`'s, over the whole cluster: the last
    `reserve` free slots (all hosts together) go only to a tenant holding
    less than its fair share (cluster capacity / tenants holding or waiting,
    at least 2). The front ends create it with reserve=1, as the
    multi-tenant HTTP server does for its own gate."""

    def __init__(self, reserve: int = 0) -> None:
        self.reserve = reserve
        normal_priority("coordinator")  # a Ray worker starts at nice 15; every run waits on this actor
        self.l = Ledger()
        self._ids = itertools.count(1)
        self._instance = secrets.token_hex(4)  # lease ids stay unique across a restart of this actor
        self._seq = itertools.count(1)

    # --- reads -----------------------------------------------------------------

    def used(self, host: str) -> int:
        return sum(1 for x in self.l.leases.values() if x.host == host)

    def held(self, tenant: str) -> int:
        return sum(1 for x in self.l.leases.values() if x.tenant == tenant)

    async def snapshot(self) -> dict:
        return {
            "capacity": dict(self.l.capacity),
            "used": {h: self.used(h) for h in self.l.capacity},
            "held": {t: self.held(t) for t in {x.tenant for x in self.l.leases.values()}},
            "waiting": len(self.l.waiters),
            "homes": dict(self.l.homes),
            "frontends": sorted(self.l.seen),
        }

    # --- leases -------------------------------------------------------------------

    async def acquire(
        self,
        frontend: str,
        tenant: str,
        hosts: dict[str, int],
        *,
        workspace: str | None = None,
        max_concurrent: int | None = None,
        per_minute: int | None = None,
        released: list[str] | None = None,
    ) -> dict:
        """Wait for a slot on one of `hosts` (name -> slots it reports, healthy
        ones only, as the front end sees them). {"lease", "host"} or {"refused": why}.

        `released`: leases of `frontend` whose runs have ended, freed here
        before anything is counted. A front end releases off its answer path
        (a `release` sent after the answer) and repeats those still
        unconfirmed here: Ray does not order calls to an async actor, and a
        tenant's next run must never be refused by its quota because the
        release of its previous one arrived later."""
        self._touch(frontend)
        if released:
            await self.release_many(released)
        self.l.capacity.update(hosts)
        if max_concurrent is not None:
            mine = self.held(tenant) + sum(1 for w in self.l.waiters if w.tenant == tenant)
            if mine >= max_concurrent:
                return {
                    "refused": (
                        f"quota: tenant {tenant!r} already has {max_concurrent} command(s) running "
                        f"(max_concurrent={max_concurrent}, counted across the cluster); wait for one to "
                        "finish (inspect_result with wait_seconds) or cancel one (cancel_command), then retry"
                    )
                }
        if per_minute is not None:
            now = time.monotonic()
            recent = self.l.recent.setdefault(tenant, deque())
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= per_minute:
                return {
                    "refused": (
                        f"quota: tenant {tenant!r} started {per_minute} commands in the last minute "
                        f"(runs_per_minute={per_minute}, counted across the cluster); "
                        f"retry in {60 - (now - recent[0]):.0f} s"
                    )
                }
            recent.append(now)
        eligible = tuple(hosts)
        if workspace is not None:
            home = self.l.homes.get(workspace)
            if home is None or home not in hosts:
                if home is not None:
                    return {
                        "refused": (
                            f"the workspace of this run lives on host {home!r}, which is not available "
                            "now (lost or unhealthy); its files are there. Retry when it is back"
                        ),
                        "host_unavailable": home,
                    }
            else:
                eligible = (home,)
        if not eligible:
            return {"refused": "no healthy agent in the cluster can take runs now"}
        host = None if self.l.waiters else self._free_host(eligible, tenant)
        if host is not None:
            lease = self._grant(frontend, tenant, host)
        else:
            fut = asyncio.get_running_loop().create_future()
            waiter = Waiter(frontend, tenant, eligible, fut, next(self._seq))
            self.l.waiters.append(waiter)
            self._dispatch()  # a slot may be free on a host the others do not wait for
            try:
                lease = await fut
            except BaseException:
                if waiter in self.l.waiters:
                    self.l.waiters.remove(waiter)
                elif fut.done() and not fut.cancelled():
                    # Handed a slot as it was cancelled: give it to the next one.
                    self.l.leases.pop(fut.result().lease_id, None)
                    self._dispatch()
                raise
        if workspace is not None:
            self.l.homes.setdefault(workspace, lease.host)
        return {"lease": lease.lease_id, "host": lease.host}

    async def release(self, lease_id: str) -> None:
        if self.l.leases.pop(lease_id, None) is not None:
            self._dispatch()

    async def release_many(self, lease_ids: list[str]) -> None:
        """Release each (idempotent: an unknown or already released id is nothing)."""
        if [lid for lid in lease_ids if self.l.leases.pop(lid, None) is not None]:
            self._dispatch()

    async def renew(self, frontend: str, lease_ids: list[str]) -> int:
        """`frontend` is alive and holds exactly `lease_ids`; drops the rest of
        its leases and every lease of front ends silent for LEASE_TTL."""
        self._touch(frontend)
        keep = set(lease_ids)
        now = time.monotonic()
        for lid, lease in list(self.l.leases.items()):
            # A lease granted after the front end took its list is not in it:
            # Ray does not order calls to an async actor, so a renew can
            # arrive after a grant it did not know of. Only older ones go.
            if lease.frontend == frontend and lid not in keep and now - lease.granted_at > RENEW_GRACE:
                del self.l.leases[lid]
        for fe, at in list(self.l.seen.items()):
            if now - at > LEASE_TTL:
                del self.l.seen[fe]
                for lid, lease in list(self.l.leases.items()):
                    if lease.frontend == fe:
                        del self.l.leases[lid]
        self._dispatch()
        return len(keep)

    async def forget_host(self, host: str) -> None:
        """A host was lost: its slots are gone until it reports again."""
        self.l.capacity.pop(host, None)
        for lid, lease in list(self.l.leases.items()):
            if lease.host == host:
                del self.l.leases[lid]

    async def home_of(self, workspace: str) -> str | None:
        return self.l.homes.get(workspace)

    async def place(self, workspace: str, hosts: dict[str, int]) -> str | None:
        """The workspace's home; one without a home yet (a file tool used it
        before any run) is homed as a run would be: on the host of `hosts`
        with the most free slots (then the fewest workspaces). None when
        `hosts` is empty."""
        home = self.l.homes.get(workspace)
        if home is not None or not hosts:
            return home
        self.l.capacity.update(hosts)
        homed = [h for h in self.l.homes.values()]
        best = max(sorted(hosts), key=lambda h: (self.l.capacity.get(h, 0) - self.used(h), -homed.count(h)))
        self.l.homes[workspace] = best
        return best

    async def forget_home(self, workspace: str) -> None:
        """A session workspace was removed: its home goes too."""
        self.l.homes.pop(workspace, None)

    # --- inside -----------------------------------------------------------------------

    def _touch(self, frontend: str) -> None:
        self.l.seen[frontend] = time.monotonic()

    def _may_take(self, tenant: str) -> bool:
        """FairGate.may_take over the cluster's total capacity."""
        capacity = sum(self.l.capacity.values())
        free = capacity - len(self.l.leases)
        if free <= 0:
            return False
        if free > self.reserve:
            return True
        tenants = {x.tenant for x in self.l.leases.values()} | {w.tenant for w in self.l.waiters} | {tenant}
        return self.held(tenant) < capacity / max(2, len(tenants))

    def _free_host(self, eligible: tuple[str, ...], tenant: str | None = None) -> str | None:
        """The eligible host with the most free slots (spreads runs); None when
        `tenant` may not take one now (the reserve)."""
        if tenant is not None and self.reserve and not self._may_take(tenant):
            return None
        best, best_free = None, 0
        for h in eligible:
            free = self.l.capacity.get(h, 0) - self.used(h)
            if free > best_free:
                best, best_free = h, free
        return best

    def _grant(self, frontend: str, tenant: str, host: str) -> Lease:
        lease = Lease(f"{frontend}:{self._instance}:{next(self._ids)}", frontend, tenant, host)
        self.l.leases[lease.lease_id] = lease
        return lease

    def _dispatch(self) -> None:
        """Hand free slots to waiters: fewest held first, then longest waiting."""
        while self.l.waiters:
            for w in sorted(self.l.waiters, key=lambda w: (self.held(w.tenant), w.seq)):
                host = self._free_host(w.hosts, w.tenant)
                if host is not None:
                    self.l.waiters.remove(w)
                    if not w.future.done():
                        w.future.set_result(self._grant(w.frontend, w.tenant, host))
                    break
            else:
                return
