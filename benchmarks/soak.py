"""Soak: many mixed calls through the real MCP server (stdio), at concurrency 4.

    .venv/bin/python benchmarks/soak.py                # 1,000 calls (about 5 minutes)
    .venv/bin/python benchmarks/soak.py --calls 10000  # about an hour on 2 CPUs
    .venv/bin/python benchmarks/soak.py --calls 300 --no-write

The mix cycles through: ok, failing (exit 3), timeout, OOM, flood (20 MB of
stdout, capped), cancel (background, then cancel_command) and a pooled-shape
echo. Each call's outcome is checked against what that kind must give.
Reports: calls that failed unexpectedly (target 0); containers, cgroups,
bundles and file descriptors leaked (target 0); the server's RSS growth
after warm-up, from the second block of 100 calls to the last 100 (target
< 5%; the first block is the allocator warming up: a 1,000-call run grew
+12.2% from it but +1.5% after it, so it is shown but not judged); p50/p95
latency by kind.
Writes the table to docs/soak.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    check_clean,
    fresh_base,
    leftovers,
    machine_line,
    server_pid,
    status_kib,
)

BIN = Path(sys.executable).with_name("gvisor-mcp")
DOC = Path(__file__).resolve().parent.parent / "docs" / "soak.md"
POLICY = """\
version: 1
quotas: {max_concurrent: 8, runs_per_minute: 1000000}
"""

KINDS = ("ok", "fail", "timeout", "oom", "flood", "cancel", "ok")
WARMUP = 100
"""Calls per RSS block; the first block is the warm-up."""
GROWTH_TARGET = 0.05


def expect(kind: str, s: dict) -> str | None:
    """None when the structured result is what `kind` must give, else why not."""
    if kind == "ok":
        good = s["status"] == "exited" and s["exit_code"] == 0 and s["stdout"] == "hello\n"
    elif kind == "fail":
        good = s["status"] == "exited" and s["exit_code"] == 3
    elif kind == "timeout":
        good = s["status"] == "timed_out" and not s["oom_killed"]
    elif kind == "oom":
        good = s["status"] == "oom_killed" and s["oom_killed"]
    elif kind == "flood":
        good = s["status"] == "exited" and s["stdout_bytes"] == 20_000_000 and s["stdout_truncated"]
    elif kind == "cancel":
        good = s["status"] == "killed"
    else:
        good = False
    return None if good else f"{kind}: got status={s['status']} exit={s['exit_code']} error={s.get('error')}"


async def one(client, kind: str) -> dict:  # type: ignore[no-untyped-def]
    args: dict = {
        "ok": {"command": "echo hello"},
        "fail": {"command": "echo no >&2; exit 3"},
        "timeout": {"command": "sleep 30", "timeout_seconds": 0.5},
        "oom": {"command": "python3 -c 'bytearray(400*1024*1024)'", "memory_mb": 64},
        "flood": {"command": "head -c 20000000 /dev/zero"},
        "cancel": {"command": "sleep 60", "background": True},
    }[kind]
    r = await client.call_tool("execute_command", args)
    if r.is_error:
        return {"status": "tool_error", "exit_code": None, "error": r.content[0].text, "oom_killed": False}
    s = r.structured_content
    if kind == "cancel":
        c = await client.call_tool("cancel_command", {"result_id": s["result_id"]})
        s = (
            c.structured_content
            if not c.is_error
            else {"status": "tool_error", "exit_code": None, "error": c.content[0].text}
        )
    return s


async def soak(calls: int, concurrency: int) -> dict:
    from mcp import Client, StdioServerParameters

    base = fresh_base("soak")
    policy = base / "policy.yaml"
    policy.write_text(POLICY)
    cgroup = f"{CGROUP_PREFIX}-soak"
    params = StdioServerParameters(
        command=str(BIN),
        args=[
            "serve",
            "--state-root",
            str(base),
            "--cgroup-parent",
            cgroup,
            "--state-dir",
            str(base / "state"),
            "--policy",
            str(policy),
        ],
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "WARNING"},
    )
    load_before = os.getloadavg()
    latencies: dict[str, list[float]] = defaultdict(list)
    unexpected: list[str] = []
    rss_at: dict[int, int] = {}
    done = 0
    async with Client(params) as client:
        pid = server_pid(base)
        await one(client, "ok")  # warm-up: imports, first sandbox
        fds_start = server_fds(pid, base / "bundles")
        queue = [KINDS[i % len(KINDS)] for i in range(calls)]
        lock = anyio.Lock()

        async def worker() -> None:
            nonlocal done
            while queue:
                kind = queue.pop(0)
                t = time.perf_counter()
                s = await one(client, kind)
                latencies[kind].append(time.perf_counter() - t)
                why = expect(kind, s)
                async with lock:
                    done += 1
                    if why:
                        unexpected.append(why)
                    rss_at[done] = status_kib(pid, "VmRSS")
                    if done % 500 == 0:  # a long run's progress, for whoever watches its log
                        print(
                            f"{time.strftime('%H:%M:%S')} {done}/{calls} calls, {len(unexpected)} unexpected, "
                            f"server RSS {rss_at[done]} KiB, load {os.getloadavg()[0]:.1f}",
                            file=sys.stderr,
                            flush=True,
                        )

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        wall = time.perf_counter() - started
        # Let the pool settle, then count descriptors again.
        await anyio.sleep(2)
        fds_end = server_fds(pid, base / "bundles")
        peak = status_kib(pid, "VmHWM")
        during = leftovers(base / "runsc", base / "bundles", [])
    after = leftovers(base / "runsc", base / "bundles", [cgroup])

    def mean_rss(lo: int, hi: int) -> float:
        """Mean RSS over calls lo..hi (1-based, inclusive, clipped to the run)."""
        return statistics.mean(rss_at[i] for i in range(max(1, lo), min(calls, hi) + 1))

    first = mean_rss(1, WARMUP)
    settled = mean_rss(WARMUP + 1, 2 * WARMUP) if calls > WARMUP else first
    last = mean_rss(calls - WARMUP + 1, calls)
    block = max(WARMUP, (calls // 20 + WARMUP - 1) // WARMUP * WARMUP)
    check_clean("soak", [(base / "runsc", base / "bundles")], [cgroup])
    return {
        "calls": calls,
        "concurrency": concurrency,
        "wall_s": wall,
        "unexpected": unexpected,
        "leaks_after": after,
        "pool_sandboxes_while_running": len(during.get("runsc list", [])),
        "fds_start": fds_start,
        "fds_end": fds_end,
        "rss_first100_kib": first,
        "rss_second100_kib": settled,
        "rss_last100_kib": last,
        "rss_growth_from_first": (last - first) / first,
        "rss_growth": (last - settled) / settled,
        "rss_block": block,
        "rss_blocks_mib": [mean_rss(b + 1, b + block) / 1024 for b in range(0, calls, block)],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "peak_rss_kib": peak,
        "latency": {k: (statistics.median(v), _p95(v), len(v)) for k, v in latencies.items()},
    }


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def server_fds(pid: int, bundles: Path) -> int:
    """The server's open fds, less those its spare launchers hold
    (sandbox/spares.py: each spare's config.json, output files and the
    launcher's stdin pipe, made after the first cold run of a shape and
    kept): a spare is not a leak, and whether one exists at warm-up depends
    on whether the warm-up call ran cold."""
    spares = [n.removeprefix(".spare-") for n in os.listdir(bundles) if n.startswith(".spare-")]
    pipes = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and spares:
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if any(cid.encode() in args for cid in spares):
                    pipes.add(os.readlink(f"/proc/{entry}/fd/0"))
            except OSError:
                continue
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/.spare-" not in target and target not in pipes:
            count += 1
    return count


def report(m: dict) -> str:
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    leaks = sum(len(v) for v in m["leaks_after"].values())
    fd_growth = m["fds_end"] - m["fds_start"]
    lines = [
        f"{machine_line()}.",
        "Load average (1/5/15 min) before -> after: "
        + " / ".join(f"{x:.2f}" for x in m["load_before"])
        + " -> "
        + " / ".join(f"{x:.2f}" for x in m["load_after"])
        + " on 2 CPUs shared with other agents' test runs: latencies are the machine's, not the server's.",
        f"{m['calls']} calls through `gvisor-mcp serve` (stdio, SDK client) at concurrency {m['concurrency']}, "
        f"in {m['wall_s']:.0f} s ({m['calls'] / m['wall_s']:.1f} calls/s). Mix: ok, failing, timeout (0.5 s), "
        "OOM (400 MB under 64 MiB), flood (20 MB stdout), cancel, ok.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| calls that failed unexpectedly | {len(m['unexpected'])} | 0: {ok(not m['unexpected'])} |",
        f"| containers / cgroups / bundles left after stop | {leaks} | 0: {ok(leaks == 0)} |",
        f"| server fds, after warm-up -> after the run | {m['fds_start']} -> {m['fds_end']} "
        f"| no growth: {ok(fd_growth <= 0)} |",
        f"| server RSS after warm-up, mean of calls {WARMUP + 1}-{2 * WARMUP} -> last {WARMUP} | "
        f"{m['rss_second100_kib'] / 1024:.1f} MiB -> {m['rss_last100_kib'] / 1024:.1f} MiB "
        f"({m['rss_growth'] * 100:+.1f}%) | < {GROWTH_TARGET:.0%}: {ok(m['rss_growth'] < GROWTH_TARGET)} |",
        f"| (warm-up included) first {WARMUP} -> last {WARMUP} calls | {m['rss_first100_kib'] / 1024:.1f} MiB -> "
        f"{m['rss_last100_kib'] / 1024:.1f} MiB ({m['rss_growth_from_first'] * 100:+.1f}%) | not judged |",
        f"| server peak RSS | {m['peak_rss_kib'] / 1024:.1f} MiB | |",
        "",
        f"Server RSS, mean per block of {m['rss_block']} calls (MiB): "
        + ", ".join(f"{x:.1f}" for x in m["rss_blocks_mib"])
        + ".",
        "",
        "| kind | calls | p50 | p95 |",
        "|---|---|---|---|",
    ]
    for kind, (p50, p95, n) in sorted(m["latency"].items()):
        lines.append(f"| {kind} | {n} | {p50 * 1000:.0f} ms | {p95 * 1000:.0f} ms |")
    if m["unexpected"]:
        lines += ["", "Unexpected outcomes (first 10):", ""] + [f"- {u}" for u in m["unexpected"][:10]]
    if m["leaks_after"]:
        lines += ["", f"Leaked: {m['leaks_after']}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--calls", type=int, default=1000, help="how many calls (default 1000; 10000 for the long soak, about an hour)"
    )
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.calls < 3 * WARMUP:
        p.error(
            f"--calls {args.calls}: at least {3 * WARMUP}, so the RSS after warm-up "
            f"(calls {WARMUP + 1}-{2 * WARMUP}) and the last {WARMUP} calls do not overlap"
        )
    m = anyio.run(soak, args.calls, args.concurrency)
    text = report(m)
    print(text)
    if not args.no_write:
        DOC.write_text("# Soak run\n\nProduced by `benchmarks/soak.py`; see docs/security.md.\n\n" + text + "\n")
    bad = m["unexpected"] or m["leaks_after"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
