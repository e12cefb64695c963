"""Where the time of a Manager.run (and of an execute_command) goes.

Three views of the same loops (cold `true`, warm `true`, a 100 MB flood, and
warm execute_command calls through the server):

1. Phases, wall clock: the Manager's own steps are wrapped with timers from
   here (nothing in src/ is changed): bundle (root dir, spec, config.json),
   cgroup creation, process spawn, runsc boot (until runsc marks the
   container running), command + sandbox shutdown (until `runsc run`
   exits), result, teardown.
2. CPU: getrusage of this process (Python) and of its children (runsc: the
   client, the sandbox and the gofer, reaped by the client), per run.
3. py-spy samples (`py-spy record --idle --nonblocking --format raw`, of
   this process, or of the `gvisor-mcp serve` process), grouped into
   buckets by the frames on the stack.

    .venv/bin/python benchmarks/profile_manager.py [-n 20] [--no-write] [--json FILE] [--keep DIR]

`--keep DIR` also saves py-spy's raw (collapsed) stacks there, for a flame
graph (e.g. inferno or flamegraph.pl).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    check_clean,
    common_args,
    emit,
    fresh_base,
    machine_line,
    med,
)

from gvisor_mcp import logs  # noqa: E402
from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox import container as container_mod  # noqa: E402
from gvisor_mcp.sandbox.cgroups import Cgroup  # noqa: E402
from gvisor_mcp.sandbox.container import Container  # noqa: E402
from gvisor_mcp.sandbox.runsc import BootWatch, Runsc  # noqa: E402

TITLE = "Where the time goes (profile)"
CGROUP = f"{CGROUP_PREFIX}-profile"
PY_SPY = Path(sys.executable).with_name("py-spy")

# --- 1. phase timers --------------------------------------------------------

EVENTS: list[tuple[str, float, float]] = []


def _timed(name: str, fn, is_async: bool):  # type: ignore[no-untyped-def]
    if is_async:

        async def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            t = time.monotonic()
            try:
                return await fn(*a, **kw)
            finally:
                EVENTS.append((name, t, time.monotonic()))
    else:

        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            t = time.monotonic()
            try:
                return fn(*a, **kw)
            finally:
                EVENTS.append((name, t, time.monotonic()))

    return wrapper


def instrument() -> None:
    """Wrap the Manager's steps (in this process only) with timers."""
    C = Container
    C.start = _timed("create_sandbox", C.start, True)
    C._supervise = _timed("supervise", C._supervise, True)
    C.teardown = _timed("teardown", C.teardown, True)
    container_mod.feed = _timed("feed", container_mod.feed, True)
    container_mod.make_root = _timed("make_root", container_mod.make_root, False)
    container_mod.build_spec = _timed("build_spec", container_mod.build_spec, False)
    container_mod._runsc_error = _timed("runsc_log", container_mod._runsc_error, False)
    Cgroup.create = _timed("cgroup_create", Cgroup.create, False)
    Cgroup.apply = _timed("cgroup_apply", Cgroup.apply, False)
    Cgroup.stats = _timed("cgroup_stats", Cgroup.stats, False)
    Cgroup.remove = _timed("cgroup_remove", Cgroup.remove, True)
    Runsc.open_run = _timed("spawn", Runsc.open_run, True)
    Runsc.delete = _timed("runsc_delete", Runsc.delete, True)
    Runsc.kill = _timed("runsc_kill", Runsc.kill, True)
    BootWatch.wait = _timed("boot_wait", BootWatch.wait, True)
    BootWatch.close = _timed("inotify_close", BootWatch.close, False)
    shutil_rmtree = container_mod.shutil.rmtree

    def rmtree(*a, **kw):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return shutil_rmtree(*a, **kw)
        finally:
            EVENTS.append(("rmtree", t, time.monotonic()))

    container_mod.shutil = type("shutil_proxy", (), {"rmtree": staticmethod(rmtree)})


def phases_of(
    events: list[tuple[str, float, float]], t0: float, t1: float, warm: bool, claim: float | None = None
) -> dict[str, float]:
    """Split one run [t0, t1] into phases (seconds) from its timer events."""
    first: dict[str, tuple[float, float]] = {}
    total: dict[str, float] = defaultdict(float)
    for name, a, b in events:
        first.setdefault(name, (a, b))
        total[name] += b - a
    sup_a, sup_b = first["supervise"]
    # Runs answer first and remove the sandbox in the background (a warm one
    # as soon as the command's exit status is known, a cold one once its
    # result is built): then no teardown of this run is inside [t0, t1]. The
    # previous run's background teardown may start after t0: only one that
    # starts after this run's supervision ended is this run's.
    td_a, td_b = next(((a, b) for n, a, b in events if n == "teardown" and a >= sup_b), (t1, t1))
    if td_a > t1:
        td_a = td_b = t1
    out: dict[str, float] = {}
    if warm:
        # The Manager's own claim time (boot_duration of a warm hit): until
        # the claim line is written to the stub.
        claimed = t0 + (claim or 0.0)
        out["claim (cgroup limits, peak reset, claim line written)"] = claimed - t0
        out["warm: command, until its exit is reported (or `runsc run` exits)"] = sup_b - claimed
    else:
        cs_a, cs_b = first["create_sandbox"]
        # Only this run's own: a spare launcher made in the background
        # (sandbox/spares.py) spawns and makes a cgroup too.
        spawn = sum(b - a for n, a, b in events if n == "spawn" and cs_a <= a <= cs_b)
        cg = sum(b - a for n, a, b in events if n == "cgroup_create" and cs_a <= a <= cs_b)
        boot_b = first["boot_wait"][1] if "boot_wait" in first else sup_a
        out["before the sandbox (validate, admission)"] = cs_a - t0
        out["bundle: root dir, spec, config.json"] = (cs_b - cs_a) - spawn - cg
        out["cgroup create + limits"] = cg
        out["process spawn (`runsc run` fork/exec)"] = spawn
        out["runsc boot (until state `running`)"] = boot_b - cs_b
        out["command + sandbox shutdown (until `runsc run` exits)"] = sup_b - boot_b
    out["result: cgroup stats, runsc log"] = td_a - sup_b
    in_td = defaultdict(float)
    for name, a, b in events:
        if td_a <= a and b <= td_b:
            in_td[name] += b - a
    out["teardown: inotify fd close (BootWatch.close)"] = in_td["inotify_close"]
    out["teardown: runsc delete"] = in_td["runsc_delete"]
    out["teardown: cgroup remove"] = in_td["cgroup_remove"]
    out["teardown: bundle rmtree"] = in_td["rmtree"]
    out["teardown: rest (close pipes, state check)"] = (td_b - td_a) - sum(
        in_td[k] for k in ("inotify_close", "runsc_delete", "cgroup_remove", "rmtree")
    )
    out["after teardown (return)"] = t1 - td_b
    return out


# --- 3. py-spy ----------------------------------------------------------------

BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    # Frames are tried from the innermost outwards; for one frame, the first bucket listed wins.
    ("inotify fd close (BootWatch.close; the kernel waits out an SRCU grace period)", ("BootWatch.close",)),
    (
        "output handling (pipe reads, pump, bounded capture, result stream files)",
        (
            "_read_ready (asyncio/unix_events",
            "_pipe_data_received",
            "streams.py",
            "StreamReaderWrapper",
            "pump (",
            "output.py",
            "Job.seen",
            "jobs.py:seen",
            "write_chunk",
            "spill",
        ),
    ),
    ("bundle writing (root dir, spec, config.json)", ("rootfs.py", "spec.py")),
    ("cgroups (create, limits, stats, remove)", ("cgroups.py",)),
    ("teardown (close pipes, runsc delete, rmtree)", ("teardown (", "rmtree")),
    (
        "process spawn (fork/exec of runsc)",
        (
            "_posixsubprocess",
            "subprocess.py",
            "open_process",
            "_make_subprocess_transport",
            "subprocess_exec",
            "base_subprocess.py",
        ),
    ),
    ("boot watch (inotify, state file)", ("BootWatch", "_is_running")),
    ("result store / audit (SQLite, files)", ("sqlite", "audit.py", "gvisor_mcp/results")),
    ("policy resolution", ("gvisor_mcp/policy/",)),
]
MCP_FRAMES = ("(mcp/", "(mcp_types/", "gvisor_mcp/stdio.py", "gvisor_mcp/tools/", "gvisor_mcp/server.py")
"""Anywhere in a stack not claimed by a bucket above: the MCP layer (JSON-RPC
framing, pydantic validation of messages, the tool function, stdio)."""
GENERIC = ("pydantic", "json/")


POOL_FRAMES = ("_boot (", "maintain (", "destroy (", "wait_warm")
IDLE_LEAVES = (
    "select (selectors.py",
    "_run_once (",
    "_do_waitpid (",
    "Condition.wait (",
    "Queue.get (",
    "wait (threading.py",
    "poll (",
)


def classify(stack: str) -> str | None:
    """The bucket of one sample; None for samples not counted: py-spy
    attaching, and idle helper threads (asyncio's child watchers block in
    waitpid, anyio's workers wait for work), which would otherwise add one
    idle sample per thread per tick."""
    frames = stack.split(";")
    main = frames[0].startswith("<module>")
    if any("__enter__ (profile_manager" in f or "__exit__ (profile_manager" in f for f in frames):
        return None
    if any(n in frames[-1] for n in IDLE_LEAVES):
        return "idle: event loop waiting (on runsc, the client, the pipe)" if main else None
    if any(any(n in f for n in POOL_FRAMES) for f in frames):
        return "pool refill (booting the next pooled sandbox, off the call's path)"
    for frame in reversed(frames):
        for bucket, needles in BUCKETS:
            if any(n in frame for n in needles):
                return bucket
    if any(any(n in f for n in MCP_FRAMES) for f in frames):
        return "MCP layer (JSON-RPC framing, message validation, tool function, stdio)"
    if any(any(n in f for n in GENERIC) for f in frames):
        return "pydantic / JSON outside MCP (options, results)"
    return "other Python (event loop, anyio, Manager bookkeeping)"


class Spy:
    """py-spy record of a process while a block runs."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out

    def __enter__(self) -> Spy:
        self.proc = subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                "500",
                "--idle",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # let it attach
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -signal.SIGINT) or not self.out.exists():
            raise RuntimeError(f"py-spy failed ({self.proc.returncode}): {err.decode(errors='replace')[-1000:]}")

    def buckets(self) -> Counter:
        """Samples per bucket."""
        c: Counter = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            bucket = classify(stack) if count.isdigit() else None
            if bucket is not None:
                c[bucket] += int(count)
        return c


SHUTDOWN = "command + sandbox shutdown (until `runsc run` exits)"
EXEC_VARIANTS = [
    ("`/bin/sh -c true` (a shell builtin)", ["/bin/sh", "-c", "true"]),
    ("`/bin/sh -c 'exec /usr/bin/true'`", ["/bin/sh", "-c", "exec /usr/bin/true"]),
    (
        "`/bin/sh -c 'exec /usr/bin/env -i /usr/bin/true'` (two execs, as warm claims once did)",
        ["/bin/sh", "-c", "exec /usr/bin/env -i /usr/bin/true"],
    ),
]

# --- the loops ----------------------------------------------------------------


async def loop(manager: Manager, options: ContainerOptions, n: int, warm: bool) -> dict:
    phases: dict[str, list[float]] = defaultdict(list)
    walls = []
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if warm:
        manager.warm(options, 1)
    for _ in range(n):
        if warm:
            await manager.wait_warm(options)
            await anyio.sleep(0.25)  # let the refill settle, as bench_manager does
        EVENTS.clear()
        t0 = time.monotonic()
        r = await manager.run(options)
        t1 = time.monotonic()
        assert r.exit_code == 0 and r.warm == warm, r.summary()
        walls.append(t1 - t0)
        events = [e for e in EVENTS if e[1] >= t0]
        for k, v in phases_of(events, t0, t1, warm, r.boot_duration if warm else None).items():
            phases[k].append(v)
    if warm:
        manager.warm(options, 0)
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall": walls,
        "phases": {k: med(v) for k, v in phases.items()},
        "cpu_self": (r1s.ru_utime + r1s.ru_stime - r0s.ru_utime - r0s.ru_stime) / n,
        "cpu_children": (r1c.ru_utime + r1c.ru_stime - r0c.ru_utime - r0c.ru_stime) / n,
    }


async def bench(n: int, keep: Path | None) -> tuple[str, dict]:
    if not PY_SPY.exists():
        raise SystemExit(f"{PY_SPY} not found: install the bench extra (`pip install -e '.[bench]'`)")
    instrument()
    base = fresh_base("profile")
    if keep is not None and base in keep.resolve().parents:
        raise SystemExit(f"--keep {keep}: choose a directory outside {base}")
    spy_dir = keep or base / "spy"
    spy_dir.mkdir(parents=True, exist_ok=True)
    manager = Manager(
        ManagerConfig(
            bundle_base_dir=str(base / "bundles"),
            runsc_root=str(base / "runsc"),
            cgroup_parent=CGROUP,
        )
    )
    true = ContainerOptions(command=["true"])
    flood = ContainerOptions(command=["head", "-c", "100000000", "/dev/zero"])
    flood_n = max(5, n // 4)
    exec_n = max(10, n // 2)
    execs: dict[str, float] = {}
    results: dict[str, dict] = {}
    spies: dict[str, Counter] = {}
    server_spy: Counter = Counter()
    server_rt: list[float] = []
    try:
        async with manager:
            await manager.run(true)
            for name, opts, warm, count in (
                ("cold", true, False, n),
                ("warm", true, True, n),
                ("flood", flood, False, flood_n),
            ):
                spy = Spy(os.getpid(), spy_dir / f"{name}.txt")
                with spy:
                    results[name] = await loop(manager, opts, count, warm)
                spies[name] = spy.buckets()
            # What one exec costs inside the sandbox (a warm claim now runs
            # one, the command's, in a process the stub forked at boot).
            for label, argv in EXEC_VARIANTS:
                r = await loop(manager, ContainerOptions(command=argv), exec_n, False)
                execs[label] = r["phases"][SHUTDOWN]
        server_spy, server_rt = await server_profile(base, n, spy_dir)
    finally:
        check_clean(
            TITLE,
            [(base / "runsc", base / "bundles"), (base / "server" / "runsc", base / "server" / "bundles")],
            [CGROUP, f"{CGROUP_PREFIX}-server"],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)  # --keep DIR must be outside it

    lines = [
        f"{machine_line()}; n={n} (flood {flood_n}); medians per run. Phase timers wrap the "
        "Manager's steps from the profiling script; CPU from getrusage (children = the runsc "
        "client with its sandbox and gofer); py-spy at 500 Hz with idle samples.",
        "",
        "| phase (wall, median ms) | cold `true` | warm `true` | cold 100 MB flood |",
        "|---|---:|---:|---:|",
    ]
    keys: list[str] = []
    for name in ("cold", "warm", "flood"):
        for k in results[name]["phases"]:
            if k not in keys:
                keys.append(k)
    for k in keys:
        cells = []
        for name in ("cold", "warm", "flood"):
            v = results[name]["phases"].get(k)
            cells.append(f"{v * 1000:.1f}" if v is not None else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append(
        "| **whole `Manager.run`** | "
        + " | ".join(f"**{med(results[x]['wall']) * 1000:.1f}**" for x in ("cold", "warm", "flood"))
        + " |"
    )
    lines.append(
        "| CPU of this Python process per run | "
        + " | ".join(f"{results[x]['cpu_self'] * 1000:.1f}" for x in ("cold", "warm", "flood"))
        + " |"
    )
    lines.append(
        "| CPU of runsc (client + sandbox + gofer) per run | "
        + " | ".join(f"{results[x]['cpu_children'] * 1000:.1f}" for x in ("cold", "warm", "flood"))
        + " |"
    )
    lines += [
        "",
        "Teardown rows read 0 where the run answered first and removed its sandbox in the "
        "background (every run here: the result is built, then it is returned); the "
        "teardown's CPU still shows in the rows below and in the py-spy buckets.",
        "",
        "py-spy: where the Python process is busy (samples at 500 Hz that are not the event "
        "loop waiting in epoll), in ms per run, and the bucket's share of the busy samples. "
        "Everything else is waiting on runsc.",
        "",
        "| bucket (ms per run, share of busy) | cold `true` | warm `true` | cold 100 MB flood | server, warm `execute_command` |",
        "|---|---:|---:|---:|---:|",
    ]
    columns = [(spies["cold"], n), (spies["warm"], n), (spies["flood"], flood_n), (server_spy, max(1, len(server_rt)))]
    all_b: list[str] = []
    for c, _ in columns:
        for b, _ in c.most_common():
            if b not in all_b and not b.startswith("idle"):
                all_b.append(b)
    busy = [sum(v for k, v in c.items() if not k.startswith("idle")) or 1 for c, _ in columns]
    for b in all_b:
        cells = []
        for (c, runs), tot in zip(columns, busy, strict=True):
            cells.append(f"{c.get(b, 0) * 2 / runs:.1f} ({100 * c.get(b, 0) / tot:.0f}%)")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append(
        "| **busy, all buckets** | "
        + " | ".join(f"**{tot * 2 / runs:.1f}**" for (_, runs), tot in zip(columns, busy, strict=True))
        + " |"
    )
    lines.append(
        "| idle (event loop waiting), share of the main thread's samples | "
        + " | ".join(
            f"{100 * sum(v for k, v in c.items() if k.startswith('idle')) / (sum(c.values()) or 1):.0f}%"
            for c, _ in columns
        )
        + " |"
    )
    if server_rt:
        lines += [
            "",
            f'Server column: {len(server_rt)} warm `execute_command("true")` calls (median round trip '
            f"{med(server_rt) * 1000:.1f} ms), samples of the `gvisor-mcp serve` process, including the "
            "pool refill that each call starts.",
        ]
    lines += [
        "",
        f"Exec cost inside the sandbox: cold runs (n={exec_n} each) of commands that differ only in how many "
        'programs they exec; the phase from "running" until `runsc run` exits:',
        "",
        "| command | execs after start | command + sandbox shutdown, median ms |",
        "|---|---:|---:|",
    ]
    for (label, _argv), count in zip(EXEC_VARIANTS, (0, 1, 2), strict=True):
        lines.append(f"| {label} | {count} | {execs[label] * 1000:.1f} |")
    metrics = {
        name: {
            "wall_ms": med(r["wall"]) * 1000,
            "phases_ms": {k: v * 1000 for k, v in r["phases"].items()},
            "cpu_self_ms": r["cpu_self"] * 1000,
            "cpu_children_ms": r["cpu_children"] * 1000,
            "spy": dict(spies[name]),
        }
        for name, r in results.items()
    }
    metrics["server_spy"] = dict(server_spy)
    metrics["exec_ms"] = {k: v * 1000 for k, v in execs.items()}
    return "\n".join(lines), metrics


async def server_profile(base: Path, n: int, spy_dir: Path) -> tuple[Counter, list[float]]:
    from bench_mcp import bench_policy, call_true, server_params, server_pid, wait_pool_full
    from mcp import Client

    policy = base / "policy.yaml"
    policy.write_text(bench_policy())
    root = base / "server"
    rts = []
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(server_params(base, "server", policy, 2)))
        pid = server_pid(root)
        await wait_pool_full(root / "runsc", 2)
        await call_true(client)
        spy = Spy(pid, spy_dir / "server.txt")
        with spy:
            for _ in range(n):
                await wait_pool_full(root / "runsc", 2)
                await anyio.sleep(0.25)  # settled, as in bench_manager
                dt, _ = await call_true(client)
                rts.append(dt)
    return spy.buckets(), rts


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="save py-spy's raw stacks in this directory")
    args = ap.parse_args()
    logs.configure("WARNING")
    table, metrics = anyio.run(bench, args.n, args.keep)
    emit(args, TITLE, table, metrics)


if __name__ == "__main__":
    main()
