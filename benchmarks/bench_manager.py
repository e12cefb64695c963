"""Manager.run(["true"]) cold and warm against a raw `runsc run` of an equivalent bundle.

Both are measured in the same run, interleaved (raw, manager, raw, ...), so
machine noise hits both alike. Prints a table with medians and the ratio, and
writes it to docs/benchmarks.md (section "Manager overhead").

    .venv/bin/python benchmarks/bench_manager.py [-n 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from gvisor_mcp import logs  # noqa: E402
from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig, build_spec  # noqa: E402
from gvisor_mcp.sandbox.rootfs import host_system_entries, make_root, write_etc  # noqa: E402

BASE = Path("/run/gvisor-mcp-bench")


def raw_bundle(base: Path, etc: Path, i: int) -> tuple[Path, str]:
    """A bundle equivalent to what the Manager writes for `true` (same image,
    same limits); runsc creates and removes the cgroup itself here."""
    cid = f"raw-{uuid.uuid4().hex[:12]}"
    bundle = base / "raw" / cid
    bundle.mkdir(parents=True)
    make_root(bundle / "rootfs", ["/"], host_system_entries())
    opts = ContainerOptions(command=["true"])
    res = opts.resources.merged_over(ManagerConfig().default_resources)
    spec = build_spec(
        opts, root_path=str(bundle / "rootfs"), etc_dir=str(etc),
        cgroups_path=f"/gvisor-mcp-bench-raw/{cid}", resources=res,
    )
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle, cid


def raw_run(base: Path, etc: Path, i: int) -> float:
    bundle, cid = raw_bundle(base, etc, i)
    argv = [
        shutil.which("runsc"), f"--root={base / 'raw-root'}", "--platform=systrap",
        "--network=none", "--overlay2=root:memory",
        f"--log={bundle / 'runsc.log'}", "--log-format=json",
        "run", f"--bundle={bundle}", "--", cid,
    ]
    t = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=bundle)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"raw runsc failed: {r.stderr.decode()}")
    shutil.rmtree(bundle)
    return dt


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logs.configure("WARNING")
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    etc = write_etc(BASE / "etc")
    manager = Manager(
        ManagerConfig(
            bundle_base_dir=str(BASE / "bundles"),
            runsc_root=str(BASE / "runsc"),
            cgroup_parent="gvisor-mcp-bench",
        )
    )
    raw, ours, boots, warm, warm_boots = [], [], [], [], []
    true = ContainerOptions(command=["true"])
    try:
        async with manager:
            # Warm caches (page cache for runsc and /usr) before measuring.
            raw_run(BASE, etc, -1)
            await manager.run(true)
            for i in range(args.n):
                raw.append(await anyio.to_thread.run_sync(raw_run, BASE, etc, i))
                t = time.perf_counter()
                r = await manager.run(true)
                ours.append(time.perf_counter() - t)
                boots.append(r.boot_duration)
                assert r.exit_code == 0 and not r.warm, r.summary()
                # Warm: fill the pool (off the clock), then time one claim.
                manager.warm(true, 1)
                await manager.wait_warm(true)
                t = time.perf_counter()
                r = await manager.run(true)
                warm.append(time.perf_counter() - t)
                warm_boots.append(r.boot_duration)
                manager.warm(true, 0)
                assert r.exit_code == 0 and r.warm, r.summary()
    finally:
        shutil.rmtree(BASE, ignore_errors=True)

    def ms(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:.1f}"

    def p90(xs: list[float]) -> str:
        return f"{sorted(xs)[int(len(xs) * 0.9) - 1] * 1000:.1f}"

    ratio = statistics.median(ours) / statistics.median(raw)
    wratio = statistics.median(warm) / statistics.median(raw)
    version = subprocess.run(["runsc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    table = "\n".join(
        [
            f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"kernel {platform.release()}; {version}; {time.strftime('%Y-%m-%d')}; n={args.n} each, interleaved.",
            "",
            "| what | median ms | p90 ms | ratio to raw |",
            "|---|---:|---:|---:|",
            f"| raw `runsc run` of `true` (equivalent bundle, reference) | {ms(raw)} | {p90(raw)} | 1.00 |",
            f"| `Manager.run([\"true\"])` (cold) | {ms(ours)} | {p90(ours)} | {ratio:.2f} |",
            f"| of which boot (`boot_duration`) | {ms(boots)} | {p90(boots)} | |",
            f"| `Manager.run([\"true\"])` (warm pool hit) | {ms(warm)} | {p90(warm)} | {wratio:.2f} |",
            f"| of which claim (`boot_duration`) | {ms(warm_boots)} | {p90(warm_boots)} | |",
            "",
            f"Targets: cold Manager overhead <= 10% over raw runsc (measured {100 * (ratio - 1):+.1f}%); "
            f"warm <= 0.35x raw (measured {wratio:.2f}x).",
        ]
    )
    print(table)
    if not args.no_write:
        write_section("Manager overhead (issue 2)", table)


if __name__ == "__main__":
    anyio.run(main)
