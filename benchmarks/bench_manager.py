"""Manager.run(["true"]) cold and warm against a raw `runsc run` of an equivalent bundle.

All are measured in the same run, interleaved (raw, cold, cold with the
MemTotal namespace, cold with runsc joining the cgroup itself, cold without
spare launchers, warm, raw, ...), so machine noise hits them alike. The
raw reference is the Manager's own runsc command line without its launcher
(runsc makes and joins the cgroup itself, as before issue 18), so the ratio
shows what the launcher gains. Warm: a second Manager keeps a pool
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
    CGROUP_PREFIX,
    Raw,
    bench_main,
    check_cold_warm_clean,
    fresh_base,
    machine_line,
    med,
    ms,
    p90,
    verdict,
)

from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "Manager.run"
CGROUP = f"{CGROUP_PREFIX}-manager"
SETTLE = 0.25
COLD_TARGET = 0.90
WARM_TARGET = 0.25


async def bench(n: int) -> tuple[str, dict]:
    base = fresh_base("manager")
    raw = Raw(base, write_etc(base / "etc"))

    def config(name: str) -> ManagerConfig:
        return ManagerConfig(
            bundle_base_dir=str(base / name / "bundles"),
            runsc_root=str(base / name / "runsc"),
            cgroup_parent=f"{CGROUP}-{name}",
        )

    raws, cold, boots, warm, claims, plain, old, nospare = [], [], [], [], [], [], [], []
    frozen = 0
    true = ContainerOptions(command=["true"])
    try:
        # Five Managers: four never pool (cold: as shipped; showing the
        # memory limit in /proc/meminfo, through a mount namespace per run;
        # runsc joining the cgroup itself, as before issue 18; the launcher
        # started on the clock, as before spare launchers), one keeps a
        # pool of 1 all along, as the server does.
        async with (
            Manager(config("cold")) as cold_m,
            Manager(config("warm")) as warm_m,
            Manager(config("plain").model_copy(update={"report_memory_limit": True})) as plain_m,
            Manager(config("old").model_copy(update={"cgroup_prejoin": False})) as old_m,
            Manager(config("nospare").model_copy(update={"spare_launchers": False})) as nospare_m,
        ):
            warm_m.warm(true, 1)
            # Warm caches (page cache for runsc and /usr) before measuring.
            raw.run()
            await cold_m.run(true)
            await plain_m.run(true)
            await old_m.run(true)
            await nospare_m.run(true)
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
                r = await plain_m.run(true)
                plain.append(time.perf_counter() - t)
                assert r.exit_code == 0 and not r.warm, r.summary()
                t = time.perf_counter()
                r = await old_m.run(true)
                old.append(time.perf_counter() - t)
                assert r.exit_code == 0 and not r.warm, r.summary()
                t = time.perf_counter()
                r = await nospare_m.run(true)
                nospare.append(time.perf_counter() - t)
                assert r.exit_code == 0 and not r.warm, r.summary()
                # Idle over pool_freeze_after by now (the cold rows ran): frozen, thawed by the claim.
                frozen += any(w.container.frozen for v in warm_m.pool.ready.values() for w in v)
                t = time.perf_counter()
                r = await warm_m.run(true)
                warm.append(time.perf_counter() - t)
                claims.append(r.boot_duration)
                assert r.exit_code == 0 and r.warm, r.summary()
    finally:
        check_cold_warm_clean(TITLE, base, raw, CGROUP, extra=("plain", "old", "nospare"))

    ratio = med(cold) / med(raws)
    pratio = med(plain) / med(raws)
    oratio = med(old) / med(raws)
    nratio = med(nospare) / med(raws)
    wratio = med(warm) / med(raws)
    table = "\n".join(
        [
            f"{machine_line()}; n={n} each, interleaved; warm: pool of 1 kept on, refilled and settled "
            f"({SETTLE * 1000:.0f} ms) before each iteration.",
            "",
            "| what | median ms | p90 ms | ratio to raw |",
            "|---|---:|---:|---:|",
            f"| raw `runsc run` of `true` (equivalent bundle, reference) | {ms(med(raws))} | {ms(p90(raws))} | 1.00 |",
            f'| `Manager.run(["true"])` (cold) | {ms(med(cold))} | {ms(p90(cold))} | {ratio:.2f} |',
            f"| of which boot (`boot_duration`) | {ms(med(boots))} | {ms(p90(boots))} | |",
            f'| `Manager.run(["true"])` (cold, `report_memory_limit=True`: MemTotal = limit, a mount namespace per run) '
            f"| {ms(med(plain))} | {ms(p90(plain))} | {pratio:.2f} |",
            f'| `Manager.run(["true"])` (cold, `cgroup_prejoin=False`: runsc joins the leaf itself, as before '
            f"issue 18) | {ms(med(old))} | {ms(p90(old))} | {oratio:.2f} |",
            f'| `Manager.run(["true"])` (cold, `spare_launchers=False`: its launcher started and joined on the clock, '
            f"as before the fourth pass) | {ms(med(nospare))} | {ms(p90(nospare))} | {nratio:.2f} |",
            f'| `Manager.run(["true"])` (warm pool hit; {frozen}/{n} claimed a frozen sandbox) | {ms(med(warm))} '
            f"| {ms(p90(warm))} | {wratio:.2f} |",
            f"| of which claim (`boot_duration`) | {ms(med(claims))} | {ms(p90(claims))} | |",
            "",
            f"Targets: cold <= {COLD_TARGET:.2f}x raw: {verdict(ratio <= COLD_TARGET)} ({ratio:.2f}x); "
            f"warm <= {WARM_TARGET:.2f}x raw: {verdict(wratio <= WARM_TARGET)} ({wratio:.2f}x).",
        ]
    )
    metrics = {
        "raw_ms": med(raws) * 1000,
        "cold_ms": med(cold) * 1000,
        "warm_ms": med(warm) * 1000,
        "plain_ms": med(plain) * 1000,
        "cold_ratio": ratio,
        "plain_ratio": pratio,
        "old_ms": med(old) * 1000,
        "old_ratio": oratio,
        "nospare_ms": med(nospare) * 1000,
        "nospare_ratio": nratio,
        "warm_ratio": wratio,
        "n": n,
        "samples_ms": {
            "raw": [x * 1000 for x in raws],
            "cold": [x * 1000 for x in cold],
            "warm": [x * 1000 for x in warm],
        },
    }
    return table, metrics


def main() -> None:
    bench_main(__doc__, TITLE, bench)


if __name__ == "__main__":
    main()
