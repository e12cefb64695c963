"""execute_command("true") end to end through the SDK's stdio client, cold and
warm, and gVisor's own Python binding, against a raw `runsc run` of an
equivalent bundle; plus the server's memory, idle and with its pool full.

Two `gvisor-mcp serve` processes are started once (off the clock), each with
its own state root and cgroup parent: one with `--pool-size 0` (cold) and
one with `--pool-size N` (warm, default 2 as shipped). Per iteration, in
this order: raw runsc (reference), one cold call, one warm call (after the
pool has refilled, off the clock), one binding sandbox (create + exec
`true` + close). Times are client-side call_tool round trips. Then N
back-to-back warm calls without waiting for the refill.

CPU (issue 18): raw runsc's own (getrusage of the child), and the CPU of
everything the back-to-back calls cost (this client, the servers, every
runsc process, until the pool has refilled: so each call's refill boot is
in), read from a v1 cpuacct cgroup this process joins at the start. Divided
by the CPUs, it is the least time per call that back-to-back calls can
average once they outlast the pool; and the CPU the pool burns while idle.

The raw reference's bundle is what the policy resolves `true` to: `/bin/sh
-c true` as uid 1000 with the session workspace bind-mounted, the policy's
memory/CPU/pids limits.

    .venv/bin/python benchmarks/bench_mcp.py [-n 20] [--pool-size 2] [--no-write] [--json FILE]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    RAW_CGROUP,
    CpuMeter,
    Raw,
    check_clean,
    children_cpu,
    cmdline,
    common_args,
    emit,
    fresh_base,
    machine_line,
    med,
    ms,
    newest_leaf_frozen,
    p90,
    pss_kib,
    runsc_processes,
    server_pid,
    status_kib,
    verdict,
)

from gvisor_mcp import logs  # noqa: E402
from gvisor_mcp.policy import ExecRequest, default_policy_text, loads, resolve  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "execute_command over MCP stdio, and gVisor's Python binding"
MEM_TITLE = "Server memory"
BIN = Path(sys.executable).with_name("gvisor-mcp")
TENANT = "default"
WARM_TARGET = 0.25


def bench_policy() -> str:
    """The built-in policy, with a rate quota that a benchmark does not trip
    (60 runs/minute by default)."""
    text = default_policy_text().decode()
    text, count = re.subn(r"(?m)^([ \t]*runs_per_minute:)[ \t]*\d+", r"\1 1000000", text)
    assert count == 1, "default policy has no runs_per_minute line"
    loads(text)  # fail here, not in the server
    return text


def server_params(base: Path, name: str, policy: Path, pool: int):  # type: ignore[no-untyped-def]
    from mcp import StdioServerParameters

    root = base / name
    return StdioServerParameters(
        command=str(BIN),
        args=[
            "serve",
            "--state-root",
            str(root),
            "--cgroup-parent",
            f"{CGROUP_PREFIX}-{name}",
            "--state-dir",
            str(root / "state"),
            "--policy",
            str(policy),
            "--pool-size",
            str(pool),
        ],
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "WARNING"},
    )


def running_sandboxes(root: Path) -> list[str]:
    """Containers runsc has marked running under `root` (read from its state files)."""
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return out
    for n in names:
        if n.endswith(".state") and "_sandbox:" in n:
            try:
                if json.loads((root / n).read_text()).get("status") == "running":
                    out.append(n.split("_sandbox:", 1)[0])
            except (OSError, ValueError):
                pass
    return out


async def wait_pool_full(root: Path, size: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(running_sandboxes(root)) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm pool under {root} did not refill to {size} in {timeout}s")
        await anyio.sleep(0.01)
    await anyio.sleep(0.02)  # the state file says running; let the pool take it


async def call_true(client) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    r = await client.call_tool("execute_command", {"command": "true"})
    dt = time.perf_counter() - t
    s = r.structured_content or {}
    if r.is_error or s.get("status") != "exited" or s.get("exit_code") != 0:
        raise RuntimeError(f"execute_command('true') failed: {r}")
    return dt, s


def binding_once(runtime_dir: Path) -> tuple[float, float, float]:
    """gvisor.Sandbox: create, exec `true`, close; seconds for each."""
    import gvisor

    t0 = time.perf_counter()
    sb = gvisor.Sandbox(runtime_dir=str(runtime_dir))
    try:
        t1 = time.perf_counter()
        sb.exec("true")
        t2 = time.perf_counter()
    finally:
        sb.close()
    t3 = time.perf_counter()
    left = runsc_processes(runtime_dir / "state")
    shutil.rmtree(runtime_dir, ignore_errors=True)
    if left:
        raise RuntimeError(f"gvisor binding left processes: {left}")
    return t1 - t0, t2 - t1, t3 - t2


def binding_status() -> str | None:
    """None when the binding can be used; why not, otherwise."""
    try:
        import gvisor  # noqa: F401
    except ImportError as e:
        return f"`import gvisor` failed ({e}): install the bench extra (`pip install -e '.[bench]'`)"
    return None


def memory_of(pids: list[int]) -> dict:
    kinds: dict[str, int] = {}
    for p in pids:
        args = cmdline(p)
        kind = (
            "runsc-sandbox"
            if args and "sandbox" in args[0]
            else ("gofer" if "gofer" in args else ("run (client)" if "run" in args else "other"))
        )
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "rss_kib": sum(status_kib(p, "VmRSS") for p in pids),
        "pss_kib": sum(pss_kib(p) for p in pids),
        "processes": kinds,
    }


def cgroup_usage(parent: str) -> list[int]:
    d = Path("/sys/fs/cgroup/memory") / parent
    out = []
    if d.is_dir():
        for leaf in d.iterdir():
            try:
                out.append(int((leaf / "memory.usage_in_bytes").read_text()))
            except (OSError, ValueError):
                pass
    unified = Path("/sys/fs/cgroup") / parent
    if not out and (unified / "cgroup.controllers").exists():
        for leaf in unified.iterdir():
            try:
                out.append(int((leaf / "memory.current").read_text()))
            except (OSError, ValueError):
                pass
    return out


async def bench(n: int, pool_size: int) -> tuple[str, str, dict]:
    from mcp import Client

    base = fresh_base("mcp")
    policy_file = base / "policy.yaml"
    policy_file.write_text(bench_policy())
    raw = Raw(base, write_etc(base / "etc"))
    # The raw reference: what the policy makes of `true` (uid 1000, workspace bind).
    ws = base / "raw-workspace"
    resolved = resolve(
        loads(policy_file.read_text()), ExecRequest(command="true"), TENANT, workspace_root=ws, session_id="bench"
    )
    assert resolved.workspace_path is not None
    resolved.workspace_path.mkdir(parents=True)
    os.chown(resolved.workspace_path, 1000, 1000)
    equiv = resolved.options

    binding_problem = binding_status()
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "raw",
            "cold",
            "cold_dur",
            "cold_boot",
            "warm",
            "warm_dur",
            "warm_boot",
            "b_total",
            "b_create",
            "b_exec",
            "b_close",
            "b2b",
            "raw_cpu",
        )
    }
    warm_hits = 0
    warm_frozen = 0
    b2b_hits = 0
    mem: dict = {}
    cpu: dict = {}
    cold_root, warm_root = base / "cold", base / "warm"
    meter = CpuMeter()  # before the servers start: they and their runsc processes inherit it
    try:
        async with AsyncExitStack() as stack:
            t = time.perf_counter()
            cold = await stack.enter_async_context(Client(server_params(base, "cold", policy_file, 0)))
            startup_cold = time.perf_counter() - t
            t = time.perf_counter()
            warm = await stack.enter_async_context(Client(server_params(base, "warm", policy_file, pool_size)))
            startup_warm = time.perf_counter() - t
            cold_pid, warm_pid = server_pid(cold_root), server_pid(warm_root)
            await wait_pool_full(warm_root / "runsc", pool_size)

            # Memory: idle server (no pool), and the warm one with its pool full.
            mem["idle_server_rss_kib"] = status_kib(cold_pid, "VmRSS")
            mem["idle_server_pss_kib"] = pss_kib(cold_pid)
            mem["pool_server_rss_kib"] = status_kib(warm_pid, "VmRSS")
            pooled = runsc_processes(warm_root / "runsc")
            mem["pool"] = memory_of(pooled)
            mem["pool_size"] = pool_size
            mem["pool_cgroup_bytes"] = cgroup_usage(f"{CGROUP_PREFIX}-warm")
            await anyio.sleep(1.0)  # past the boots' own tail
            u, t = meter.seconds(), time.perf_counter()
            await anyio.sleep(2.0)
            if u is not None:
                cpu["idle_ms_per_s"] = ((meter.seconds() or 0.0) - u) * 1000 / (time.perf_counter() - t)

            # Warm-up (page cache, first-call paths), off the record.
            raw.run(equiv)
            await call_true(cold)
            await wait_pool_full(warm_root / "runsc", pool_size)
            await call_true(warm)
            if binding_problem is None:
                try:
                    await anyio.to_thread.run_sync(binding_once, base / "binding" / "warmup")
                except Exception as e:  # say exactly what happened
                    binding_problem = f"the binding failed here: {type(e).__name__}: {e}"

            for i in range(n):
                k = children_cpu()
                rows["raw"].append(await anyio.to_thread.run_sync(raw.run, equiv))
                rows["raw_cpu"].append(children_cpu() - k)
                dt, s = await call_true(cold)
                assert not s.get("warm"), s
                rows["cold"].append(dt)
                rows["cold_dur"].append(s["duration_ms"] / 1000)
                rows["cold_boot"].append(s["boot_ms"] / 1000)
                await wait_pool_full(warm_root / "runsc", pool_size)
                warm_frozen += newest_leaf_frozen(f"{CGROUP_PREFIX}-warm")
                dt, s = await call_true(warm)
                warm_hits += bool(s.get("warm"))
                rows["warm"].append(dt)
                rows["warm_dur"].append(s["duration_ms"] / 1000)
                rows["warm_boot"].append(s["boot_ms"] / 1000)
                if binding_problem is None:
                    c, e, cl = await anyio.to_thread.run_sync(binding_once, base / "binding" / str(i))
                    rows["b_create"].append(c)
                    rows["b_exec"].append(e)
                    rows["b_close"].append(cl)
                    rows["b_total"].append(c + e + cl)

            await wait_pool_full(warm_root / "runsc", pool_size)
            u = meter.seconds()
            t = time.perf_counter()
            for _ in range(n):
                dt, s = await call_true(warm)
                b2b_hits += bool(s.get("warm"))
                rows["b2b"].append(dt)
            cpu["b2b_wall_per_call"] = (time.perf_counter() - t) / n
            await wait_pool_full(warm_root / "runsc", pool_size)  # the last calls' refills, on the meter
            if u is not None:
                cpu["b2b_per_call"] = ((meter.seconds() or 0.0) - u) / n
            mem["idle_server_rss_after_kib"] = status_kib(cold_pid, "VmRSS")
            mem["idle_server_hwm_after_kib"] = status_kib(cold_pid, "VmHWM")
    finally:
        meter.close()
        check_clean(
            TITLE,
            [
                (cold_root / "runsc", cold_root / "bundles"),
                (warm_root / "runsc", warm_root / "bundles"),
                (raw.root, None),
            ],
            [f"{CGROUP_PREFIX}-cold", f"{CGROUP_PREFIX}-warm", RAW_CGROUP],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)

    r = med(rows["raw"])
    cold_ratio = med(rows["cold"]) / r
    warm_ratio = med(rows["warm"]) / r
    b2b_ratio = med(rows["b2b"]) / r

    def row(label: str, key: str, ratio: bool = True) -> str:
        xs = rows[key]
        return (
            f"| {label} | {ms(med(xs))} | {ms(p90(xs))} | {med(xs) / r:.2f} |"
            if ratio
            else f"| {label} | {ms(med(xs))} | {ms(p90(xs))} | |"
        )

    lines = [
        f"{machine_line()}; n={n} each, interleaved (raw, cold call, warm call, binding); "
        f"servers started once (cold {startup_cold:.1f} s, warm {startup_warm:.1f} s, incl. the canary); "
        f"warm server `--pool-size {pool_size}`.",
        "",
        "| what | median ms | p90 ms | ratio to raw |",
        "|---|---:|---:|---:|",
        row("raw `runsc run` of `/bin/sh -c true` (uid 1000, workspace bind; reference)", "raw"),
        row('`execute_command("true")` cold (`--pool-size 0`), call_tool round trip', "cold"),
        row("of which the server's `duration_ms` (run, excl. teardown)", "cold_dur", False),
        row("of which `boot_ms`", "cold_boot", False),
        row(
            f'`execute_command("true")` warm, pool refilled between calls ({warm_hits}/{n} warm, {warm_frozen} frozen)',
            "warm",
        ),
        row("of which the server's `duration_ms`", "warm_dur", False),
        row("of which `boot_ms` (claim)", "warm_boot", False),
        row(f'`execute_command("true")` warm, back to back ({b2b_hits}/{n} warm)', "b2b"),
    ]
    if binding_problem is None:
        lines += [
            row('gVisor binding `gvisor.Sandbox()` + `exec("true")` + `close()`', "b_total"),
            row("of which `Sandbox()` (runsc run --detach)", "b_create", False),
            row('of which `exec("true")` (runsc exec)', "b_exec", False),
            row("of which `close()` (runsc kill + delete --force)", "b_close", False),
        ]
    else:
        lines += ["", f"gVisor's Python binding: not measured: {binding_problem}"]
    targets = [
        f"cold MCP call <= 1.25x raw: {verdict(cold_ratio <= 1.25)} ({cold_ratio:.2f}x)",
        f"warm MCP call p50 <= {WARM_TARGET:.2f}x raw, settled pool: {verdict(warm_ratio <= WARM_TARGET)} "
        f"({warm_ratio:.2f}x); back to back: {verdict(b2b_ratio <= WARM_TARGET)} ({b2b_ratio:.2f}x)",
    ]
    speedup = None
    if binding_problem is None:
        speedup = med(rows["b_total"]) / med(rows["warm"])
        targets.append(
            f"warm MCP call >= 10x faster than the binding's fresh sandbox: {verdict(speedup >= 10)} ({speedup:.1f}x)"
        )
    cpus = os.cpu_count() or 1
    raw_cpu = med(rows["raw_cpu"])
    per_call = cpu.get("b2b_per_call")
    if per_call is not None:
        floor = per_call / cpus
        lines += [
            "",
            f"CPU (issue 18): a raw `runsc run` of `true` used {ms(raw_cpu)} ms of CPU (median, getrusage). "
            f"Back to back, each call used {ms(per_call)} ms of CPU in all (this client, the servers, every runsc "
            f"process, its refill's boot included; cpuacct), so on {cpus} CPUs back-to-back calls that outlast "
            f"the pool average at least {ms(floor)} ms each ({floor / r:.2f}x raw; here: "
            f"{ms(cpu['b2b_wall_per_call'])} ms, {cpu['b2b_wall_per_call'] / r:.2f}x), whatever the pool does; "
            f"{WARM_TARGET:.2f}x raw would need calls of at most {ms(WARM_TARGET * r * cpus)} ms of CPU each.",
        ]
    else:
        lines += ["", f"CPU per back-to-back call: not measured ({meter.why})."]
    lines += ["", "Targets: " + "; ".join(targets) + "."]

    per_sb = mem["pool"]["rss_kib"] / pool_size / 1024
    per_sb_pss = mem["pool"]["pss_kib"] / pool_size / 1024
    cg = mem["pool_cgroup_bytes"]
    procs = ", ".join(f"{v} {k}" for k, v in sorted(mem["pool"]["processes"].items()))
    mem_lines = [
        f"{machine_line()}; `/proc/PID/status` VmRSS and `smaps_rollup` Pss, read once the pool was full.",
        "",
        "| what | RSS MiB | PSS MiB |",
        "|---|---:|---:|",
        f"| `gvisor-mcp serve --pool-size 0`, idle after start | {mem['idle_server_rss_kib'] / 1024:.1f} | {mem['idle_server_pss_kib'] / 1024:.1f} |",
        f"| same, idle after {n + 1} calls (peak {mem['idle_server_hwm_after_kib'] / 1024:.1f}) | {mem['idle_server_rss_after_kib'] / 1024:.1f} | |",
        f"| `gvisor-mcp serve --pool-size {pool_size}`, pool full (server process only) | {mem['pool_server_rss_kib'] / 1024:.1f} | |",
        f"| all runsc processes of the {pool_size} idle pooled sandboxes ({procs}) | {mem['pool']['rss_kib'] / 1024:.1f} | {mem['pool']['pss_kib'] / 1024:.1f} |",
        f"| **per idle pooled sandbox** | **{per_sb:.1f}** | **{per_sb_pss:.1f}** |",
        f"| per idle pooled sandbox, its cgroup's memory usage (sentry + gofer, page cache incl.) | "
        f"{(sum(cg) / len(cg) / 2**20) if cg else float('nan'):.1f} | |",
        "",
        "RSS counts the runsc binary's shared pages once per process; PSS splits them, so "
        "PSS is what each extra pooled sandbox really adds.",
    ]
    if "idle_ms_per_s" in cpu:
        mem_lines += [
            "",
            f"CPU while idle (both servers, the {pool_size} pooled sandboxes, 2 s, cpuacct, from 1 s after "
            f"the pool filled): {cpu['idle_ms_per_s']:.0f} ms per second, "
            f"{cpu['idle_ms_per_s'] / pool_size:.0f} ms per second per idle pooled sandbox "
            "(frozen after `--pool-freeze-after`, default 1 s; not frozen, this runsc's systrap sentry "
            "polls ~40-60 ms per second: `bench_idle_pool.py`).",
        ]
    metrics = {
        "n": n,
        "raw_ms": r * 1000,
        "cold_ms": med(rows["cold"]) * 1000,
        "warm_ms": med(rows["warm"]) * 1000,
        "b2b_ms": med(rows["b2b"]) * 1000,
        "cold_ratio": cold_ratio,
        "warm_ratio": warm_ratio,
        "b2b_ratio": b2b_ratio,
        "warm_hits": warm_hits,
        "warm_frozen_claims": warm_frozen,
        "b2b_hits": b2b_hits,
        "binding_ms": med(rows["b_total"]) * 1000 if rows["b_total"] else None,
        "binding_problem": binding_problem,
        "binding_speedup": speedup,
        "idle_server_rss_mib": mem["idle_server_rss_kib"] / 1024,
        "pool_server_rss_mib": mem["pool_server_rss_kib"] / 1024,
        "per_pooled_sandbox_rss_mib": per_sb,
        "per_pooled_sandbox_pss_mib": per_sb_pss,
        "pool_size": pool_size,
        "cpus": cpus,
        "raw_cpu_ms": raw_cpu * 1000,
        "b2b_cpu_per_call_ms": per_call * 1000 if per_call is not None else None,
        "b2b_floor_ratio": per_call / cpus / r if per_call is not None else None,
        "idle_cpu_ms_per_s": cpu.get("idle_ms_per_s"),
        "samples_ms": {k: [x * 1000 for x in rows[k]] for k in ("raw", "cold", "warm", "b2b")},
    }
    return "\n".join(lines), "\n".join(mem_lines), metrics


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--pool-size", type=int, default=2, help="the warm server's --pool-size (default 2)")
    args = ap.parse_args()
    logs.configure("WARNING")
    body, mem_body, metrics = anyio.run(bench, args.n, args.pool_size)
    emit(args, TITLE, body, metrics, [(MEM_TITLE, mem_body)])


if __name__ == "__main__":
    main()
