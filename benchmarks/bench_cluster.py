"""Scale-out cost on this machine: a warm call through Ray vs the local Manager,
and throughput at concurrency 8 with 2 agents vs one host.

    .venv/bin/python benchmarks/bench_cluster.py [--calls 30] [--burst 40] [--rounds 3]

Both sides run `true` in a warm sandbox with the same limits, alive at the
same time and measured interleaved; "local" is a Manager in this process
(what the single-host server calls), "ray" is RayRunner -> coordinator lease
-> HostAgent actor on a worker node of a head + 2 worker LocalCluster. Then
the front end's own cost, for the N-host model: the driver's CPU per run,
the coordinator's lease rate. Last, the whole path a user sees: a real MCP
client's `execute_command` against the single-host server (`serve
--transport http`) and against a Ray front end (`--backend ray`), called
interleaved, and the front end's CPU per call. On this 2-core machine both agents share the
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

OPTS = ContainerOptions(
    command=("/bin/sh", "-c", "true"),
    user=UserSpec(uid=1000, gid=1000),
    resources=ResourceSpec(memory_mb=128, timeout=60),
)


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


POLICY = "version: 1\ntenants:\n  bench: {quotas: {max_concurrent: 8, runs_per_minute: 100000}}\n"
"""The default policy's quotas (4 at once, 60 a minute) would refuse the burst."""


async def measure(base: Path, calls: int, total: int, rounds: int) -> dict[str, list[float]]:
    """Both sides alive at once, measured interleaved (call by call, burst by
    burst), so the machine's noise hits both alike."""
    import ray

    from gvisor_mcp.cluster.agent import AgentConfig, runsc_version, start_agent
    from gvisor_mcp.cluster.frontend import RayRunner, connect
    from gvisor_mcp.cluster.local import LocalCluster
    from gvisor_mcp.runtime import PolicyHolder

    out: dict[str, list[float]] = {"local_warm": [], "ray_warm": [], "local_rate": [], "ray_rate": []}
    base.mkdir(parents=True, exist_ok=True)
    (base / "policy.yaml").write_text(POLICY)
    lc = LocalCluster(base / "c")
    t0 = time.monotonic()
    lc.start(hosts=("a", "b"))
    FACTS["cluster_start_s"] = time.monotonic() - t0
    agents = []
    cfg = ManagerConfig(
        bundle_base_dir=str(base / "l" / "bundles"),
        runsc_root=str(base / "l" / "runsc"),
        cgroup_parent="gvisor-mcp-bench-local",
        max_concurrent_containers=8,
    )
    try:
        connect(lc.address)
        for h in ("a", "b"):
            agents.append(
                start_agent(
                    AgentConfig(
                        host=h,
                        state_dir=base / h / "state",
                        pool_size=2,
                        manager=ManagerConfig(
                            bundle_base_dir=str(base / h / "bundles"),
                            runsc_root=str(base / h / "runsc"),
                            cgroup_parent=f"gvisor-mcp-bench-{h}",
                            max_concurrent_containers=4,
                        ),
                    )
                )[0]
            )
        async with (
            Manager(cfg) as m,
            RayRunner(
                PolicyHolder(str(base / "policy.yaml")),
                base / "fe" / "workspaces",
                base / "fe",
                expected_runsc_version=runsc_version("runsc"),
            ) as runner,
        ):
            m.warm(OPTS, 2)
            runner.warm(OPTS, 2)
            await runner.refresh()
            await m.wait_warm(OPTS)
            await asyncio.sleep(5)  # the agents' pools fill

            warm_seen = {"local": [], "ray": []}

            async def local():  # type: ignore[no-untyped-def]
                warm_seen["local"].append((await m.run(OPTS)).warm)

            async def remote():  # type: ignore[no-untyped-def]
                warm_seen["ray"].append((await runner.run(OPTS, run_id=rid(), tenant="bench")).warm)

            for _ in range(3):  # warm-up of both paths
                await local()
                await remote()
            warm_seen = {"local": [], "ray": []}
            for _ in range(calls):
                out["local_warm"] += await timed(1, local)
                await asyncio.sleep(0.6)  # let each pool refill: a warm call each time
                out["ray_warm"] += await timed(1, remote)
                await asyncio.sleep(0.6)
            for side, seen in warm_seen.items():
                FACTS[f"{side}_warm_share"] = sum(seen) / max(1, len(seen))
            cpu = 0.0
            for _ in range(rounds):
                out["local_rate"].append(await burst(total, 8, local))
                cpu0 = time.process_time()
                out["ray_rate"].append(await burst(total, 8, remote))
                cpu += time.process_time() - cpu0
            FACTS["driver_cpu_ms_per_run"] = cpu * 1000 / (total * rounds)
            FACTS["coordinator_leases_per_s"] = await coordinator_rate(runner.coordinator, 400, 16)
        await frontend_cost(lc, base / "fe-http", calls)
        return out
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


def _cpu_ms(pid: int) -> float:
    """utime + stime of a process, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def frontend_cost(lc, base: Path, calls: int) -> None:  # type: ignore[no-untyped-def]
    """The whole path a user sees: a real MCP client's `execute_command`
    `true` against the single-host server (`serve --transport http`) and
    against a Ray front end (`serve --transport http --backend ray`), both
    up at once and called interleaved; and the front end's CPU per call:
    what one front-end core can place per second, whatever the number of hosts."""
    import signal
    import socket
    import subprocess

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    base.mkdir(parents=True)
    policy = base / "policy.yaml"
    # runs_per_minute above what the phases start (the default 60 cut the front-end phase short)
    policy.write_text("version: 1\ntenants:\n  bench: {quotas: {max_concurrent: 8, runs_per_minute: 6000}}\n")
    binary = str(Path(sys.executable).with_name("gvisor-mcp"))
    token = subprocess.run(
        [binary, "token", "add", "bench", "--policy", str(policy), "--tokens", str(base / "tokens.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    def serve(side: str, *extra: str) -> tuple[subprocess.Popen, int]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        err = (base / f"{side}.err").open("wb")
        proc = subprocess.Popen(
            [
                binary,
                "serve",
                "--transport",
                "http",
                "--port",
                str(port),
                "--policy",
                str(policy),
                "--tokens",
                str(base / "tokens.yaml"),
                "--state-dir",
                str(base / side / "state"),
                "--state-root",
                str(base / side / "sandboxes"),
                "--pool-size",
                "2",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={"PATH": os.environ["PATH"], **lc.env()},
        )
        return proc, port

    async def wait_port(proc: subprocess.Popen, port: int, side: str) -> None:
        for _ in range(1500):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((base / f"{side}.err").read_text()[-2000:]) from None
                await asyncio.sleep(0.2)

    procs = {
        "local": serve("local", "--cgroup-parent", "gvisor-mcp-bench-serve"),
        "ray": serve("ray", "--backend", "ray", "--ray-address", lc.address),
    }
    try:
        for side, (proc, port) in procs.items():
            await wait_port(proc, port, side)

        def client(port: int) -> Client:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120)
            return Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http))

        async with client(procs["local"][1]) as cl, client(procs["ray"][1]) as cr:
            sides = {"local": cl, "ray": cr}
            for _ in range(5):  # warm up: sessions, imports, the pools for this template
                for c in sides.values():
                    await c.call_tool("execute_command", {"command": "true"})
            await asyncio.sleep(3)
            walls: dict[str, list[float]] = {"local": [], "ray": []}
            cpu = 0.0
            for _ in range(calls):
                for side, c in sides.items():
                    cpu0 = _cpu_ms(procs["ray"][0].pid)
                    t = time.perf_counter()
                    r = await c.call_tool("execute_command", {"command": "true"})
                    walls[side].append(time.perf_counter() - t)
                    if side == "ray":
                        cpu += _cpu_ms(procs["ray"][0].pid) - cpu0
                    assert r.structured_content["status"] == "exited", r
                    await asyncio.sleep(0.6)  # let the pools refill: a warm call each time
            FACTS["fe_cpu_ms_per_call"] = cpu / calls
            FACTS["fe_call_ms"] = statistics.median(walls["ray"]) * 1000
            FACTS["fe_call_p90_ms"] = sorted(walls["ray"])[int(0.9 * calls)] * 1000
            FACTS["server_call_ms"] = statistics.median(walls["local"]) * 1000
            FACTS["server_call_p90_ms"] = sorted(walls["local"])[int(0.9 * calls)] * 1000
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            proc.wait(timeout=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--burst", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from gvisor_mcp import logs

    logs.configure("WARNING", json=True)  # stderr; stdout is the table
    base = Path(tempfile.mkdtemp(prefix="bc-", dir="/run"))
    load0 = os.getloadavg()
    try:
        r = asyncio.run(measure(base, a.calls, a.burst, a.rounds))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load1 = os.getloadavg()
    lm, rm = statistics.median(r["local_warm"]) * 1000, statistics.median(r["ray_warm"]) * 1000
    lr, rr = statistics.median(r["local_rate"]), statistics.median(r["ray_rate"])

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(0.9 * len(xs))] * 1000

    print(
        f"load average (1 min) {load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} cores; "
        f"cluster (head + 2 workers) started in {FACTS['cluster_start_s']:.0f} s"
    )
    print("| measure | local Manager (one host) | Ray (front end + 2 agents) | ratio |")
    print("|---|---|---|---|")
    print(
        f"| warm `true`, median of {a.calls} interleaved (p90) | {lm:.1f} ms ({p90(r['local_warm']):.0f}) | "
        f"{rm:.1f} ms ({p90(r['ray_warm']):.0f}) | {rm / lm:.2f}x (target <= 1.15x) |"
    )
    print(
        f"| throughput, concurrency 8, {a.burst} runs, median of {a.rounds} rounds | {lr:.1f} runs/s | "
        f"{rr:.1f} runs/s | {rr / lr:.2f}x |"
    )
    sm, fm = FACTS["server_call_ms"], FACTS["fe_call_ms"]
    print(
        f"| MCP execute_command `true` over HTTP, median of {a.calls} interleaved (p90) | "
        f"{sm:.0f} ms ({FACTS['server_call_p90_ms']:.0f}) single-host server | "
        f"{fm:.0f} ms ({FACTS['fe_call_p90_ms']:.0f}) Ray front end | {fm / sm:.2f}x (target <= 1.15x) |"
    )
    print(
        f"calls served warm in the sequential part: local {FACTS['local_warm_share']:.0%}, "
        f"ray {FACTS['ray_warm_share']:.0%}"
    )
    print(
        f"front end (RayRunner, driver) CPU per run: {FACTS['driver_cpu_ms_per_run']:.1f} ms; "
        f"coordinator: {FACTS['coordinator_leases_per_s']:.0f} lease+release pairs/s (concurrency 16)"
    )
    print(
        f"front end process (serve --backend ray) per MCP execute_command `true`: "
        f"{FACTS['fe_cpu_ms_per_call']:.1f} ms CPU; "
        f"one front-end core places at most ~{1000 / FACTS['fe_cpu_ms_per_call']:.0f} calls/s"
    )


if __name__ == "__main__":
    main()
