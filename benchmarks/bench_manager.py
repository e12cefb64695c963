"""Manager.run(["true"]) cold and warm against a raw `runsc run` of an equivalent bundle.

All three are measured in the same run, interleaved (raw, cold, warm, raw,
...), so machine noise hits them alike. Warm: a second Manager keeps a pool
of 1 (as the server keeps its pool); each iteration starts once its refill
has booted and settled (SETTLE seconds, off the clock). Prints a table with medians and the
ratios, and writes it to docs/benchmarks.md (section "Manager.run").

    .venv/bin/python benchmarks/bench_manager.py [-n 20] [--no-write] [--json FILE]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX, Raw, bench_main, check_cold_warm_clean, fresh_base, machine_line, med, ms, p90, verdict,
)

from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "Manager.run"
CGROUP = f"{CGROUP_PREFIX}-manager"
SETTLE = 0.25


async def bench(n: int) -> tuple[str, dict]:
    base = fresh_base("manager")
    raw = Raw(base, write_etc(base / "etc"))

    def config(name: str) -> ManagerConfig:
        return ManagerConfig(
            bundle_base_dir=str(base / name / "bundles"),
            runsc_root=str(base / name / "runsc"),
            cgroup_parent=f"{CGROUP}-{name}",
        )

    raws, cold, boots, warm, claims = [], [], [], [], []
    true = ContainerOptions(command=["true"])
    try:
        # Two Managers: one never pools (cold), one keeps a pool of 1 all
        # along, as the server does (a claim starts the refill at once).
        async with Manager(config("cold")) as cold_m, Manager(config("warm")) as warm_m:
            warm_m.warm(true, 1)
            # Warm caches (page cache for runsc and /usr) before measuring.
            raw.run()
            await cold_m.run(true)
            for _ in range(n):
                # Off the clock: the refill from the last claim has booted and
                # settled (a sandbox claimed within ~0.1 s of its boot runs
                # slower: its runsc processes are still busy starting up).
                await warm_m.wait_warm(true)
                await anyio.sleep(SETTLE)
                raws.append(await anyio.to_thread.run_sync(raw.run))
                t = time.perf_counter()
                r = await cold_m.run(true)
                cold.append(time.perf_counter() - t)
                boots.append(r.boot_duration)
                assert r.exit_code == 0 and not r.warm, r.summary()
                t = time.perf_counter()
                r = await warm_m.run(true)
                warm.append(time.perf_counter() - t)
                claims.append(r.boot_duration)
                assert r.exit_code == 0 and r.warm, r.summary()
    finally:
        check_cold_warm_clean(TITLE, base, raw, CGROUP)

    ratio = med(cold) / med(raws)
    wratio = med(warm) / med(raws)
    table = "\n".join(
        [
            f"{machine_line()}; n={n} each, interleaved; warm: pool of 1 kept on, refilled and settled "
            f"({SETTLE * 1000:.0f} ms) before each iteration.",
            "",
            "| what | median ms | p90 ms | ratio to raw |",
            "|---|---:|---:|---:|",
            f"| raw `runsc run` of `true` (equivalent bundle, reference) | {ms(med(raws))} | {ms(p90(raws))} | 1.00 |",
            f"| `Manager.run([\"true\"])` (cold) | {ms(med(cold))} | {ms(p90(cold))} | {ratio:.2f} |",
            f"| of which boot (`boot_duration`) | {ms(med(boots))} | {ms(p90(boots))} | |",
            f"| `Manager.run([\"true\"])` (warm pool hit) | {ms(med(warm))} | {ms(p90(warm))} | {wratio:.2f} |",
            f"| of which claim (`boot_duration`) | {ms(med(claims))} | {ms(p90(claims))} | |",
            "",
            f"Targets: cold <= 1.10x raw: {verdict(ratio <= 1.10)} ({ratio:.2f}x); "
            f"warm <= 0.35x raw: {verdict(wratio <= 0.35)} ({wratio:.2f}x).",
        ]
    )
    metrics = {
        "raw_ms": med(raws) * 1000, "cold_ms": med(cold) * 1000, "warm_ms": med(warm) * 1000,
        "cold_ratio": ratio, "warm_ratio": wratio, "n": n,
    }
    return table, metrics


def main() -> None:
    bench_main(__doc__, TITLE, bench)


if __name__ == "__main__":
    main()
