"""Throughput (calls/s) at concurrency 1, 2, 4, 8: Manager.run(["true"])
(max_concurrent_containers=8) against raw `runsc run` launched in parallel.

For each concurrency c, n rounds, interleaved: one round starts c calls at
once and waits for all of them; its throughput is c / wall time. Rows show
the median round. Raw bundles are written before the clock starts; the
Manager writes its own on the clock, as in a real call. Two Manager rows:
cold (no pool) and with a warm pool of 2 (the server's default; a round of
c > 2 calls claims 2 pooled sandboxes and boots the rest cold, the pool
refilling concurrently).

    .venv/bin/python benchmarks/bench_throughput.py [-n 20] [--no-write] [--json FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    Raw,
    bench_main,
    check_cold_warm_clean,
    fresh_base,
    machine_line,
    med,
    verdict,
)

from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "Throughput"
LEVELS = (1, 2, 4, 8)
CGROUP = f"{CGROUP_PREFIX}-throughput"
POOL = 2


async def round_of(manager: Manager, c: int) -> float:
    true = ContainerOptions(command=["true"])
    results = []

    async def one() -> None:
        r = await manager.run(true)
        assert r.exit_code == 0, r.summary()
        results.append(r)

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(c):
            tg.start_soon(one)
    return c / (time.perf_counter() - t)


async def bench(n: int) -> tuple[str, dict]:
    base = fresh_base("throughput")
    raw = Raw(base, write_etc(base / "etc"))

    def config(name: str) -> ManagerConfig:
        return ManagerConfig(
            bundle_base_dir=str(base / name / "bundles"),
            runsc_root=str(base / name / "runsc"),
            cgroup_parent=f"{CGROUP}-{name}",
            max_concurrent_containers=8,
        )

    true = ContainerOptions(command=["true"])
    raw_tp: dict[int, list[float]] = {c: [] for c in LEVELS}
    cold_tp: dict[int, list[float]] = {c: [] for c in LEVELS}
    warm_tp: dict[int, list[float]] = {c: [] for c in LEVELS}
    try:
        async with Manager(config("cold")) as cold, Manager(config("warm")) as warm:
            warm.warm(true, POOL)
            raw.run()
            await cold.run(true)
            for c in LEVELS:
                for _ in range(n):
                    # Every round starts with the warm pool full and nothing booting.
                    await warm.wait_warm(true)
                    raw_tp[c].append(c / await anyio.to_thread.run_sync(raw.parallel, c))
                    cold_tp[c].append(await round_of(cold, c))
                    warm_tp[c].append(await round_of(warm, c))
    finally:
        check_cold_warm_clean(TITLE, base, raw, CGROUP)

    lines = [
        f"{machine_line()}; n={n} rounds per cell, interleaved (raw, cold, warm); calls/s = c / round wall time, median round.",
        "",
        "| concurrency | raw `runsc run` calls/s (reference) | `Manager.run` cold calls/s | ratio | `Manager.run`, pool of 2, calls/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    metrics: dict = {"n": n, "levels": {}}
    for c in LEVELS:
        r, o, w = med(raw_tp[c]), med(cold_tp[c]), med(warm_tp[c])
        lines.append(f"| {c} | {r:.2f} | {o:.2f} | {o / r:.2f} | {w:.2f} | {w / r:.2f} |")
        metrics["levels"][str(c)] = {"raw": r, "cold": o, "warm": w}
    r8, o8, w8 = (metrics["levels"]["8"][k] for k in ("raw", "cold", "warm"))
    metrics["c8_ratio"] = o8 / r8
    metrics["c8_warm_ratio"] = w8 / r8
    lines += [
        "",
        f"Target: throughput at concurrency 8 >= raw runsc's: cold {verdict(o8 >= r8)} ({o8 / r8:.2f}x), "
        f"with pool {verdict(w8 >= r8)} ({w8 / r8:.2f}x).",
    ]
    return "\n".join(lines), metrics


def main() -> None:
    bench_main(__doc__, TITLE, bench)


if __name__ == "__main__":
    main()
