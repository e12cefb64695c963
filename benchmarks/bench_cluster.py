"""Scale-out cost on this machine: a warm call through Ray vs the local Manager,
and throughput at concurrency 8 with 2 agents vs one host.

    .venv/bin/python benchmarks/bench_cluster.py [--calls 30] [--burst 40]

Both sides run `true` in a warm sandbox with the same limits; "local" is a
Manager in this process (what the single-host server calls), "ray" is
RayRunner -> coordinator lease -> HostAgent actor on a worker node of a
head + 2 worker LocalCluster. On this 2-core machine both agents share the
same cores as the local Manager did, so the throughput ratio says what Ray
costs, not what a second machine would add. Target: warm call <= 1.15x.
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
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gvisor_mcp.cluster.local import LOOPBACK_ENV  # noqa: E402

os.environ.update(LOOPBACK_ENV)

from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig, ResourceSpec, UserSpec  # noqa: E402

OPTS = ContainerOptions(command=("/bin/sh", "-c", "true"), user=UserSpec(uid=1000, gid=1000),
                        resources=ResourceSpec(memory_mb=128, timeout=60))


def rid() -> str:
    return "res_" + uuid.uuid4().hex


async def timed(n: int, call) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t)
    return out


async def burst(total: int, conc: int, call) -> float:  # type: ignore[no-untyped-def]
    sem = asyncio.Semaphore(conc)

    async def one() -> None:
        async with sem:
            await call()

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t)


async def local_side(base: Path, calls: int, total: int) -> tuple[list[float], float]:
    cfg = ManagerConfig(bundle_base_dir=str(base / "bundles"), runsc_root=str(base / "runsc"),
                        cgroup_parent="gvisor-mcp-bench-local", max_concurrent_containers=8)
    async with Manager(cfg) as m:
        m.warm(OPTS, 2)
        await m.wait_warm(OPTS)
        warm = await timed(calls, lambda: m.run(OPTS))
        rate = await burst(total, 8, lambda: m.run(OPTS))
    return warm, rate


async def ray_side(base: Path, calls: int, total: int) -> tuple[list[float], float]:
    from gvisor_mcp.cluster.agent import AgentConfig, runsc_version, start_agent
    from gvisor_mcp.cluster.frontend import RayRunner, connect
    from gvisor_mcp.cluster.local import LocalCluster
    from gvisor_mcp.server import PolicyHolder

    import ray

    lc = LocalCluster(base / "c")
    lc.start(hosts=("a", "b"))
    agents = []
    try:
        connect(lc.address)
        for h in ("a", "b"):
            agents.append(start_agent(AgentConfig(host=h, state_dir=base / h / "state", pool_size=2, manager=ManagerConfig(
                bundle_base_dir=str(base / h / "bundles"), runsc_root=str(base / h / "runsc"),
                cgroup_parent=f"gvisor-mcp-bench-{h}", max_concurrent_containers=4)))[0])
        async with RayRunner(PolicyHolder(None), base / "fe" / "workspaces", base / "fe",
                             expected_runsc_version=runsc_version("runsc")) as runner:
            runner.warm(OPTS, 2)
            await runner.refresh()
            await asyncio.sleep(5)  # pools fill
            warm = await timed(calls, lambda: runner.run(OPTS, run_id=rid(), tenant="default"))
            cpu0 = time.process_time()
            rate = await burst(total, 8, lambda: runner.run(OPTS, run_id=rid(), tenant="default"))
            FACTS["driver_cpu_ms_per_run"] = (time.process_time() - cpu0) * 1000 / total
            FACTS["coordinator_leases_per_s"] = await coordinator_rate(runner.coordinator, 400, 16)
        return warm, rate
    finally:
        for handle in agents:  # their warm sandboxes go with them, not with the cluster
            try:
                ray.get(handle.stop.remote(), timeout=60)
            except Exception as e:
                print(f"agent stop failed: {e}", file=sys.stderr)
        lc.shutdown()


FACTS: dict[str, float] = {}
"""What the N-host model in docs/scale-out.md is built from."""


async def coordinator_rate(coordinator, total: int, conc: int) -> float:  # type: ignore[no-untyped-def]
    """Lease + release pairs per second through the one coordinator actor
    (every run of every front end takes one), with fake hosts of ample slots."""
    hosts = {"bench-x": 1000, "bench-y": 1000}

    async def one() -> None:
        grant = await coordinator.acquire.remote("bench-fe", f"t{uuid.uuid4().hex[:2]}", hosts)
        await coordinator.release.remote(grant["lease"])

    rate = await burst(total, conc, one)
    await coordinator.forget_host.remote("bench-x")
    await coordinator.forget_host.remote("bench-y")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--burst", type=int, default=40)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bc-", dir="/run"))
    lw, lr = asyncio.run(local_side(base / "l", a.calls, a.burst))
    rw, rr = asyncio.run(ray_side(base / "r", a.calls, a.burst))
    lm, rm = statistics.median(lw) * 1000, statistics.median(rw) * 1000
    load = os.getloadavg()
    print(f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    print("| measure | local Manager | Ray (2 agents) | ratio |")
    print("|---|---|---|---|")
    print(f"| warm `true`, median of {a.calls} | {lm:.1f} ms | {rm:.1f} ms | {rm / lm:.2f}x (target <= 1.15x) |")
    print(f"| throughput, concurrency 8, {a.burst} runs | {lr:.1f} runs/s | {rr:.1f} runs/s | {rr / lr:.2f}x |")
    print(f"front end (driver) CPU per run through Ray: {FACTS['driver_cpu_ms_per_run']:.1f} ms; "
          f"coordinator: {FACTS['coordinator_leases_per_s']:.0f} lease+release pairs/s (concurrency 16)")
    print(f"warm p90: local {sorted(lw)[int(0.9 * len(lw))] * 1000:.1f} ms, ray {sorted(rw)[int(0.9 * len(rw))] * 1000:.1f} ms")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
