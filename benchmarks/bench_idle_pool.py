"""An idle server's CPU with its warm pool frozen or not, and the warm call
that follows a freeze (issue 18; sandbox/pool.py).

`gvisor-mcp serve --pool-size 2` is started once per round with
`--pool-freeze-after 0` (never freeze) and once with `--pool-freeze-after
1` (the default), the two alternating. Each time, once its pool is full
and has idled 2.5 s (frozen by then, when it freezes), the CPU of the
server and everything it started (cpuacct cgroup this process joins:
bench_mcp.CpuMeter) is read over 5 s; then `-n` warm
`execute_command("true")` calls, each after the pool has refilled and
idled 2.5 s again (a claim of a frozen sandbox, with freezing on).

    .venv/bin/python benchmarks/bench_idle_pool.py [-n 5] [--rounds 2] [--no-write]
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    CpuMeter,
    check_clean,
    common_args,
    emit,
    fresh_base,
    machine_line,
    med,
    ms,
    p90,
)
from bench_mcp import bench_policy, call_true, server_params, wait_pool_full  # noqa: E402

from gvisor_mcp import logs  # noqa: E402

TITLE = "Idle warm pool: frozen or not"
POOL = 2
IDLE = 2.5
WINDOW = 5.0


def frozen_leaves(parent: str) -> int:
    d = Path("/sys/fs/cgroup/freezer") / parent
    n = 0
    if d.is_dir():
        for leaf in d.iterdir():
            try:
                n += (leaf / "freezer.state").read_text().strip() == "FROZEN"
            except OSError:
                pass
    return n


async def one_server(base: Path, name: str, policy: Path, freeze_after: float, n: int, meter: CpuMeter) -> dict:
    from mcp import Client

    params = server_params(base, name, policy, POOL)
    params.args += ["--pool-freeze-after", str(freeze_after)]
    root = base / name
    out: dict = {"calls": [], "durations": [], "frozen_at_call": []}
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(params))
        await wait_pool_full(root / "runsc", POOL)
        await anyio.sleep(IDLE)
        out["frozen_at_idle"] = frozen_leaves(f"{CGROUP_PREFIX}-{name}")
        u, t = meter.seconds(), time.perf_counter()
        await anyio.sleep(WINDOW)
        if u is not None:
            out["idle_ms_per_s"] = ((meter.seconds() or 0.0) - u) * 1000 / (time.perf_counter() - t)
        for _ in range(n):
            await wait_pool_full(root / "runsc", POOL)
            await anyio.sleep(IDLE)
            out["frozen_at_call"].append(frozen_leaves(f"{CGROUP_PREFIX}-{name}"))
            dt, s = await call_true(client)
            if not s.get("warm"):
                raise RuntimeError(f"a settled call missed the pool: {s}")
            out["calls"].append(dt)
            out["durations"].append(s["duration_ms"] / 1000)
    return out


async def bench(n: int, rounds: int) -> tuple[str, dict]:
    base = fresh_base("idle-pool")
    policy = base / "policy.yaml"
    policy.write_text(bench_policy())
    meter = CpuMeter()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    names: list[str] = []
    try:
        for i in range(rounds):
            for variant, after in (("off", 0.0), ("on", 1.0)):
                name = f"idle-{variant}-{i}"
                names.append(name)
                runs[variant].append(await one_server(base, name, policy, after, n, meter))
    finally:
        meter.close()
        check_clean(
            TITLE,
            [(base / nm / "runsc", base / nm / "bundles") for nm in names],
            [f"{CGROUP_PREFIX}-{nm}" for nm in names],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)

    def flat(variant: str, key: str) -> list[float]:
        return [x for r in runs[variant] for x in r[key]]

    def idle(variant: str) -> str:
        xs = [r["idle_ms_per_s"] for r in runs[variant] if "idle_ms_per_s" in r]
        return ", ".join(f"{x:.0f}" for x in xs) if xs else "n/a (no cpuacct)"

    lines = [
        f"{machine_line()}; `--pool-size {POOL}`, {rounds} server(s) per variant, alternating; "
        f"pool idle {IDLE} s before each reading; n={n} warm calls per server.",
        "",
        "| `--pool-freeze-after` | idle CPU, ms per second (each server) | frozen leaves at reading | "
        "warm call median ms | p90 ms | server `duration_ms` median | frozen leaves before the calls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, label in (("off", "0 (never)"), ("on", "1 (default)")):
        lines.append(
            f"| {label} | {idle(variant)} | {', '.join(str(r['frozen_at_idle']) for r in runs[variant])} | "
            f"{ms(med(flat(variant, 'calls')))} | {ms(p90(flat(variant, 'calls')))} | "
            f"{ms(med(flat(variant, 'durations')))} | "
            f"{min(flat(variant, 'frozen_at_call'))}-{max(flat(variant, 'frozen_at_call'))} |"
        )
    metrics = {
        v: {
            "idle_ms_per_s": [r.get("idle_ms_per_s") for r in runs[v]],
            "call_ms": [x * 1000 for x in flat(v, "calls")],
            "duration_ms": [x * 1000 for x in flat(v, "durations")],
        }
        for v in runs
    }
    return "\n".join(lines), metrics


def main() -> None:
    ap = common_args(__doc__.splitlines()[0], default_n=5)
    ap.add_argument("--rounds", type=int, default=2, help="servers per variant (default 2)")
    args = ap.parse_args()
    logs.configure("WARNING")
    body, metrics = anyio.run(bench, args.n, args.rounds)
    emit(args, TITLE, body, metrics)


if __name__ == "__main__":
    main()
