"""Where a warm call through Ray spends its time, hop by hop.

    .venv/bin/python benchmarks/profile_cluster.py [--calls 30]

Two worker hosts, each with an agent whose store and Manager are wrapped
in timers (a subclass defined here: the agent's code itself is not
changed): "a" as shipped, "nice15" left at Ray's worker niceness (what
every agent was before cluster/priority.py). A local Manager for
reference. The hops of a warm `true` are replayed by hand on each host
(acquire, placement row, agent.run, release) so each round trip is seen on
its own; the agent's side reports its internals (spec checks, store rows,
output files, Manager.run) and when it received the call (same machine,
same clock). Then one `RayRunner.run` end to end. Prints medians;
docs/scale-out.md has the breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gvisor_mcp.cluster.local import LOOPBACK_ENV  # noqa: E402

os.environ.update(LOOPBACK_ENV)

from bench_cluster import OPTS, POLICY, rid  # noqa: E402

from gvisor_mcp.cluster.agent import HostAgent  # noqa: E402
from gvisor_mcp.sandbox import Manager, ManagerConfig  # noqa: E402


class TimedAgent(HostAgent):
    """HostAgent with timers around its store and Manager (the profile only).
    keep_ray_nice: leave the process at Ray's worker_niceness (what agents
    did before cluster/priority.py), for the comparison."""

    def __init__(self, config: Any, keep_ray_nice: bool = False) -> None:
        super().__init__(config)
        self.keep_ray_nice = keep_ray_nice

    async def start(self) -> dict[str, Any]:
        if self.keep_ray_nice:
            from gvisor_mcp.cluster import agent as agent_module

            agent_module.normal_priority = lambda role: os.getpriority(os.PRIO_PROCESS, 0)  # type: ignore[assignment]
        report = await super().start()
        self.stamps: dict[str, float] = {}
        for obj, names in ((self.store, ("exists", "start", "part_writer", "finish")), (self.manager, ("prepare",))):
            for name in names:
                setattr(obj, name, self._timed_sync(name, getattr(obj, name)))
        run = self.manager.run  # type: ignore[union-attr]

        async def timed_run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return await run(*a, **k)
            finally:
                self.stamps["manager.run"] = time.perf_counter() - t

        self.manager.run = timed_run  # type: ignore[union-attr,method-assign]
        return report

    def _timed_sync(self, name: str, fn: Any) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.stamps[name] = self.stamps.get(name, 0.0) + time.perf_counter() - t

        return wrapped

    async def run(self, spec: Any) -> dict[str, Any]:
        self.stamps = {"received_at": time.time()}
        t = time.perf_counter()
        try:
            return await super().run(spec)
        finally:
            self.stamps["agent.run"] = time.perf_counter() - t
            self.stamps["returned_at"] = time.time()

    async def last(self) -> dict[str, float]:
        return dict(self.stamps)


async def profile(base: Path, calls: int) -> dict[str, list[float]]:
    import ray

    from gvisor_mcp.cluster.agent import AgentConfig, actor_options, runsc_version
    from gvisor_mcp.cluster.frontend import RayRunner, connect
    from gvisor_mcp.cluster.local import LocalCluster
    from gvisor_mcp.runtime import PolicyHolder

    t: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        t.setdefault(k, []).append(v * 1000)

    base.mkdir(parents=True, exist_ok=True)
    (base / "policy.yaml").write_text(POLICY)
    lc = LocalCluster(base / "c")
    lc.start(hosts=HOSTS)
    handles = []
    try:
        connect(lc.address)
        for h in HOSTS:
            cfg = AgentConfig(
                host=h,
                state_dir=base / h / "state",
                pool_size=2,
                manager=ManagerConfig(
                    bundle_base_dir=str(base / h / "bundles"),
                    runsc_root=str(base / h / "runsc"),
                    cgroup_parent=f"gvisor-mcp-prof-{h}",
                    max_concurrent_containers=4,
                ),
            )
            handle = ray.remote(TimedAgent).options(**actor_options(h)).remote(cfg, keep_ray_nice=h == "nice15")
            handles.append(handle)
            report = ray.get(handle.start.remote(), timeout=300)
            print(f"agent {h}: nice {report['nice']}", file=sys.stderr)
        lcfg = ManagerConfig(
            bundle_base_dir=str(base / "l" / "bundles"),
            runsc_root=str(base / "l" / "runsc"),
            cgroup_parent="gvisor-mcp-prof-local",
            max_concurrent_containers=4,
        )
        async with (
            Manager(lcfg) as m,
            RayRunner(
                PolicyHolder(str(base / "policy.yaml")),
                base / "fe" / "ws",
                base / "fe",
                expected_runsc_version=runsc_version("runsc"),
            ) as runner,
        ):
            m.warm(OPTS, 2)
            runner.warm(OPTS, 2)
            await runner.refresh()
            await m.wait_warm(OPTS)
            await asyncio.sleep(5)
            for _ in range(3):
                await m.run(OPTS)
                await runner.run(OPTS, run_id=rid(), tenant="bench")
            for h in HOSTS:
                await runner.agents[h].handle.run.remote(runner.spec_for(OPTS, rid(), "bench").model_dump())
            warm: dict[str, int] = {}
            for _ in range(calls):
                s = time.perf_counter()
                warm["local"] = warm.get("local", 0) + (await m.run(OPTS)).warm
                add("local Manager.run", time.perf_counter() - s)
                await asyncio.sleep(0.6)
                for h in HOSTS:  # the hops by hand, on each host
                    agent = runner.agents[h]
                    s0 = time.perf_counter()
                    await agent.handle.ping.remote()
                    add(f"[{h}] agent.ping round trip", time.perf_counter() - s0)
                    spec = runner.spec_for(OPTS, rid(), "bench")
                    s0 = time.perf_counter()
                    grant = await runner.coordinator.acquire.remote(runner.frontend, "bench", {h: 4})
                    add(f"[{h}] coordinator.acquire", time.perf_counter() - s0)
                    s0 = time.perf_counter()
                    runner._db.execute(
                        "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?)",
                        (spec.result_id, h, "bench", time.time()),
                    )
                    add(f"[{h}] placement row", time.perf_counter() - s0)
                    s0 = time.perf_counter()
                    sent = time.time()
                    answer = await agent.handle.run.remote(spec.model_dump())
                    got = time.time()
                    add(f"[{h}] agent.run round trip", time.perf_counter() - s0)
                    warm[h] = warm.get(h, 0) + answer["warm"]
                    s0 = time.perf_counter()
                    await runner.coordinator.release.remote(grant["lease"])
                    add(f"[{h}] coordinator.release", time.perf_counter() - s0)
                    st = await agent.handle.last.remote()
                    add(f"[{h}]   send -> agent received", st["received_at"] - sent)
                    add(f"[{h}]   agent.run inside", st["agent.run"])
                    add(f"[{h}]     Manager.run inside agent", st["manager.run"])
                    for k in ("exists", "start", "part_writer", "finish", "prepare"):
                        add(f"[{h}]     store/manager {k}", st.get(k, 0.0))
                    add(f"[{h}]   agent returned -> driver has answer", got - st["returned_at"])
                    await asyncio.sleep(0.6)
                s = time.perf_counter()
                await runner.run(OPTS, run_id=rid(), tenant="bench")
                add("RayRunner.run end to end (either host)", time.perf_counter() - s)
                await asyncio.sleep(0.6)
            for k, v in warm.items():
                print(f"warm share {k}: {v}/{calls}", file=sys.stderr)
        return t
    finally:
        for handle in handles:
            try:
                ray.get(handle.stop.remote(), timeout=60)
            except Exception as e:
                print(f"agent stop failed: {e}", file=sys.stderr)
        lc.shutdown()


HOSTS = ("a", "nice15")
"""a: an agent as shipped (normal priority); nice15: one left at Ray's worker niceness."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    a = ap.parse_args()
    from gvisor_mcp import logs

    logs.configure("WARNING", json=True)
    base = Path(tempfile.mkdtemp(prefix="pc-", dir="/run"))
    load0 = os.getloadavg()
    try:
        t = asyncio.run(profile(base, a.calls))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average (1 min) {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after; medians of {a.calls}")
    for k, v in t.items():
        print(f"{k:45s} {statistics.median(v):7.1f} ms  (p90 {sorted(v)[int(0.9 * len(v))]:.0f})")


if __name__ == "__main__":
    main()
