"""Run every benchmark, one after the other, and write docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py [-n 20] [--only NAME ...] [--no-write]

Each benchmark runs as its own process (a clean peak-RSS counter, and one
failing does not stop the others), writes its own section of
docs/benchmarks.md, and hands its figures back as JSON; this script then
writes the "Summary" section: every target, its measured value and whether
it is met. Needs root, runsc, mmdebstrap/skopeo/umoci/docker-registry (images), and the
bench extra (`pip install -e '.[bench]'`: py-spy, gvisor, matplotlib), and draws the charts
of the "Charts" section (docs/bench-*.png). Takes 5-7 minutes on a quiet machine with 2 CPUs
and -n 20, plus a few minutes for the image build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import BASE, CGROUP_PREFIX, cmdline, machine_line, pids_matching, remove_cgroup_parents, verdict  # noqa: E402
from _report import write_section  # noqa: E402

BENCHES = [
    ("manager", "bench_manager.py"),
    ("mcp", "bench_mcp.py"),
    ("throughput", "bench_throughput.py"),
    ("flood", "bench_flood.py"),
    ("files", "bench_files.py"),
    ("network", "bench_network.py"),
    ("profile", "profile_manager.py"),
    ("images", "bench_images.py"),
]


def summary(m: dict, n: int, took: float, failed: list[str]) -> str:
    rows = []

    def target(what: str, measured: str, ok: bool | None, where: str) -> None:
        rows.append(f"| {what} | {measured} | {'not measured' if ok is None else verdict(ok)} | {where} |")

    man, mcp, tp, fl, fi = (m.get(k) for k in ("manager", "mcp", "throughput", "flood", "files"))
    if man:
        target(
            "cold `Manager.run` <= 0.90x raw runsc (issue 18)",
            f"{man['cold_ratio']:.2f}x ({man['cold_ms']:.0f} vs {man['raw_ms']:.0f} ms; with the MemTotal "
            f"namespace {man['plain_ratio']:.2f}x; runsc joining the cgroup itself {man['old_ratio']:.2f}x; "
            f"launcher started on the clock {man.get('nospare_ratio', float('nan')):.2f}x)",
            man["cold_ratio"] <= 0.90,
            "Manager.run",
        )
        target(
            "warm `Manager.run` <= 0.25x raw",
            f"{man['warm_ratio']:.2f}x ({man['warm_ms']:.0f} ms)",
            man["warm_ratio"] <= 0.25,
            "Manager.run",
        )
    if mcp:
        target(
            "cold MCP `execute_command` <= 1.25x raw",
            f"{mcp['cold_ratio']:.2f}x ({mcp['cold_ms']:.0f} vs {mcp['raw_ms']:.0f} ms)",
            mcp["cold_ratio"] <= 1.25,
            "execute_command over MCP",
        )
        target(
            "warm MCP call p50 <= 0.25x raw, settled pool (issue 18)",
            f"{mcp['warm_ratio']:.2f}x ({mcp['warm_ms']:.0f} ms)",
            mcp["warm_ratio"] <= 0.25,
            "execute_command over MCP",
        )
        target(
            "warm MCP call p50 <= 0.25x raw, back to back (issue 18)",
            f"{mcp['b2b_ratio']:.2f}x ({mcp['b2b_ms']:.0f} ms, {mcp['b2b_hits']}/{mcp['n']} warm)"
            + (
                f"; floor of the mean by CPU {mcp['b2b_floor_ratio']:.2f}x ({mcp['b2b_cpu_per_call_ms']:.0f} ms of CPU per call"
                f" on {mcp['cpus']} CPUs)"
                if mcp.get("b2b_floor_ratio") is not None
                else ""
            ),
            mcp["b2b_ratio"] <= 0.25,
            "execute_command over MCP",
        )
        if mcp.get("binding_speedup") is not None:
            target(
                "warm MCP call >= 10x faster than the gVisor binding's fresh sandbox",
                f"{mcp['binding_speedup']:.1f}x ({mcp['binding_ms']:.0f} vs {mcp['warm_ms']:.0f} ms)",
                mcp["binding_speedup"] >= 10,
                "execute_command over MCP",
            )
        else:
            target(
                "warm MCP call >= 10x faster than the gVisor binding",
                mcp.get("binding_problem") or "?",
                None,
                "execute_command over MCP",
            )
    if tp:
        c8 = tp["levels"]["8"]
        target(
            "throughput at concurrency 8 >= raw runsc's",
            f"{tp['c8_ratio']:.2f}x cold ({c8['cold']:.1f} vs {c8['raw']:.1f} calls/s); {tp['c8_warm_ratio']:.2f}x with a pool of 2",
            tp["c8_ratio"] >= 1.0,
            "Throughput",
        )
    if fl:
        target(
            "100 MB flood >= 1.0x raw runsc writing a regular file (issue 18)",
            f"{fl['file_ratio']:.2f}x ({fl['ours_ms']:.0f} vs {fl['raw_file_ms']:.0f} ms); "
            f"execute_command {fl.get('server_file_ratio', 0):.2f}x (of raw with the policy's limits to a file)",
            fl["file_ratio"] >= 1.0 and fl.get("server_file_ratio", 0) >= 1.0,
            "100 MB stdout flood",
        )
        target(
            "100 MB flood >= 0.8x raw throughput (Manager.run)",
            f"{fl['throughput_ratio']:.2f}x ({fl['ours_ms']:.0f} vs {fl['raw_ms']:.0f} ms)",
            fl["throughput_ratio"] >= 0.8,
            "100 MB stdout flood",
        )
        target(
            "100 MB flood >= 0.8x raw throughput (execute_command)",
            f"{fl['server_throughput_ratio']:.2f}x ({fl['server_ms']:.0f} vs {fl['raw_sh_ms']:.0f} ms)",
            fl["server_throughput_ratio"] >= 0.8,
            "100 MB stdout flood",
        )
        target(
            "server peak RSS < 150 MB during the flood",
            f"{fl['server_hwm_mb']:.0f} MB",
            fl["server_hwm_mb"] < 150,
            "100 MB stdout flood",
        )
    if fi:
        target(
            "4 KiB write_file / read_file p50 < 5 ms over MCP stdio",
            f"{fi['write_ms']:.1f} / {fi['read_ms']:.1f} ms (MCP floor {fi['floor_ms']:.1f} ms)",
            fi["write_ms"] < 5 and fi["read_ms"] < 5,
            "File tools over MCP stdio",
        )
    im = m.get("images")
    if im:
        target(
            "cold run in a store image <= 1.10x raw runsc (same rootfs)",
            f"{im['cold_ratio']:.2f}x ({im['cold_ms']:.0f} vs {im['raw_ms']:.0f} ms)",
            im["cold_ratio"] <= 1.10,
            "Store images",
        )
        target(
            "warm run in a store image <= 0.35x raw",
            f"{im['warm_ratio']:.2f}x ({im['warm_ms']:.0f} ms)",
            im["warm_ratio"] <= 0.35,
            "Store images",
        )
        build = f"{im['build_s']:.0f} s" if im.get("build_s") is not None else "reused"
        rows.append(
            f"| (no target) image build; pull from 127.0.0.1 | {build}; {im['pull_s']:.1f} s "
            f"({im['image_mib']:.0f} MiB image) | | Store images |"
        )
    net = m.get("network")
    if net:
        target(
            "cold network=sandbox <= 1.20x cold none",
            f"{net['cold_ratio']:.2f}x ({net['sandbox_ms']:.0f} vs {net['none_ms']:.0f} ms)",
            net["cold_ratio"] <= 1.20,
            "network=sandbox",
        )
        target(
            "warm network=sandbox <= 0.5x raw",
            f"{net['warm_ratio']:.2f}x ({net['warm_ms']:.0f} ms)",
            net["warm_ratio"] <= 0.5,
            "network=sandbox",
        )
        target(
            "100 MB through the proxy >= 0.5x direct",
            f"{net['download_ratio']:.2f}x ({net['proxied_mbps']:.0f} vs {net['direct_mbps']:.0f} MB/s)",
            net["download_ratio"] >= 0.5,
            "network=sandbox",
        )
    if mcp:
        rows.append(
            f"| (no target) server RSS idle; per idle pooled sandbox | {mcp['idle_server_rss_mib']:.0f} MiB; "
            f"{mcp['per_pooled_sandbox_rss_mib']:.0f} MiB RSS, {mcp['per_pooled_sandbox_pss_mib']:.0f} MiB PSS | | Server memory |"
        )
    lines = [
        f"{machine_line()}; n={n} per row; whole run {took / 60:.1f} min "
        "(`.venv/bin/python benchmarks/run_all.py`). Ratios are to a raw `runsc run` of an "
        "equivalent bundle measured in the same run, interleaved.",
        "",
        "| target | measured | | section |",
        "|---|---|---|---|",
        *rows,
    ]
    if failed:
        lines += ["", "Failed in this run (their sections keep older figures): " + ", ".join(failed) + "."]
    return "\n".join(lines)


DIRS = ("manager", "mcp", "throughput", "flood", "network", "profile", "files", "images")
"""The directories under BASE (and cgroup parents `gvisor-mcp-bench-*`) these benchmarks use."""
CGROUPS = ("manager", "cold", "warm", "raw", "throughput", "flood", "server", "network", "profile", "files", "images")


def leftovers_anywhere() -> list[str]:
    """Anything of ours still there once every benchmark has finished (other
    scripts sharing BASE, such as soak.py, are left alone)."""
    out = []
    for d in DIRS:
        out += [" ".join(cmdline(p))[:160] for p in pids_matching(f"--root={BASE / d}/")]
        if (BASE / d).exists():
            out.append(str(BASE / d))
    for ctl in Path("/sys/fs/cgroup").iterdir():
        if not ctl.is_symlink() and ctl.is_dir():
            for name in CGROUPS:
                out += [str(x) for x in ctl.glob(f"{CGROUP_PREFIX}-{name}*/*") if x.is_dir()]
    return out


CHARTS_TITLE = "Charts"


def charts(metrics: dict) -> str:
    """Draw the PNGs into docs/ and return the section that shows them."""
    try:
        from _charts import LATENCY_PNG, TARGETS_PNG, draw

        written = draw(metrics, machine_line())
    except ImportError as e:
        return f"Not drawn in this run: {e} (install the bench extra: `pip install -e '.[bench]'`)."
    names = {p.name for p in written}
    lines = ["Drawn by `benchmarks/run_all.py` (`benchmarks/_charts.py`) from the same run as the Summary above."]
    if TARGETS_PNG in names:
        lines += [
            "",
            "Every target as a ratio to raw `runsc run` (black tick: the target; green met, red not):",
            "",
            f"![targets]({TARGETS_PNG})",
        ]
    if LATENCY_PNG in names:
        lines += [
            "",
            "Latency of every call, raw runsc against cold and warm (log scale):",
            "",
            f"![latency]({LATENCY_PNG})",
        ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="runs per row (default 20; the issue asks for >= 20)")
    ap.add_argument("--only", nargs="*", choices=[b for b, _ in BENCHES], help="run only these")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    metrics: dict = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gvisor-mcp-bench-") as tmp:
        for name, script in BENCHES:
            if args.only and name not in args.only:
                continue
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / script), "-n", str(args.n), "--json", str(out)]
            if args.no_write:
                cmd.append("--no-write")
            print(f"=== {script} ===", flush=True)
            t = time.perf_counter()
            r = subprocess.run(cmd)
            print(
                f"=== {script}: {'ok' if r.returncode == 0 else f'FAILED ({r.returncode})'} "
                f"in {time.perf_counter() - t:.0f} s ===\n",
                flush=True,
            )
            if r.returncode == 0 and out.exists():
                metrics[name] = json.loads(out.read_text())
            else:
                failed.append(name)
    remove_cgroup_parents([CGROUP_PREFIX])  # left by older versions of these scripts
    took = time.perf_counter() - t0
    text = summary(metrics, args.n, took, failed)
    left = leftovers_anywhere()
    if left:
        failed.append("cleanup")
        text += "\n\nLEFT BEHIND after the run: " + "; ".join(left)
    else:
        text += (
            f"\n\nCleanup checked after every benchmark and again at the end: no runsc process with a "
            f"root under {BASE}, no container in any of its `runsc list`, no bundle, no cgroup leaf."
        )
    print(f"## Summary\n\n{text}\n")
    if not args.no_write and not args.only:
        write_section("Summary", text)
        write_section(CHARTS_TITLE, charts(metrics))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
