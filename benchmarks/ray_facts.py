"""Facts about Ray on this machine that the cluster backend is built on.

    .venv/bin/python benchmarks/ray_facts.py

Starts a head + 2 worker nodes (gvisor_mcp.cluster.local: token auth,
loopback only, no dashboard, fast health checks), then measures: start-up,
task and actor call overhead, the cost of returning a page of bytes, what a
caller sees when a node is killed or frozen mid-call and after how long, and
what a client with a wrong token or no token gets. Prints a table; the
figures are copied by hand into docs/scale-out.md with the load seen.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gvisor_mcp.cluster import HOST_RESOURCE_PREFIX  # noqa: E402
from gvisor_mcp.cluster.local import LOOPBACK_ENV, LocalCluster, ray_processes  # noqa: E402

os.environ.update(LOOPBACK_ENV)

CLIENT = """
import sys, time
import ray
t = time.monotonic()
try:
    ray.init(address=sys.argv[1])
    print("CONNECTED")
except Exception as e:
    print("REFUSED", type(e).__name__, str(e)[:160].replace(chr(10), " "))
print("AFTER %.1f" % (time.monotonic() - t))
"""


def per_call_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    facts: list[tuple[str, str]] = []
    base = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
    lc = LocalCluster(base)
    t0 = time.monotonic()
    lc.start(hosts=("a", "b"))
    import ray

    ray.init(address=lc.address)
    facts.append(("cluster start (head)", f"{lc.timings['head_s']:.1f} s"))
    facts.append(("+ 2 worker nodes", f"{lc.timings['workers_s']:.1f} s"))
    facts.append(("head + 2 workers + driver connected", f"{time.monotonic() - t0:.1f} s"))
    try:

        @ray.remote(num_cpus=0)
        def noop() -> int:
            return 1

        ray.get(noop.remote())
        facts.append(("task round trip (median of 100)", f"{per_call_ms(lambda: ray.get(noop.remote()), 100):.2f} ms"))

        @ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
        class Probe:
            async def ping(self) -> int:
                return os.getpid()

            async def page(self, n: int) -> bytes:
                return b"x" * n

            async def sleep(self, s: float) -> float:
                import asyncio

                await asyncio.sleep(s)
                return s

        a = Probe.options(resources={f"{HOST_RESOURCE_PREFIX}a": 0.01}).remote()
        b = Probe.options(resources={f"{HOST_RESOURCE_PREFIX}b": 0.01}).remote()
        ray.get([a.ping.remote(), b.ping.remote()])
        facts.append(
            (
                "async actor call round trip (median of 200)",
                f"{per_call_ms(lambda: ray.get(a.ping.remote()), 200):.2f} ms",
            )
        )
        for n in (65536, 262144, 4 << 20):
            facts.append(
                (f"actor call returning {n} bytes", f"{per_call_ms(lambda n=n: ray.get(a.page.remote(n)), 30):.2f} ms")
            )

        # A node killed mid-call (every Ray process of it SIGKILLed).
        ref = a.sleep.remote(120)
        time.sleep(1)
        t = time.monotonic()
        lc.remove_host("a")
        try:
            ray.get(ref, timeout=120)
            facts.append(("node killed mid-call", "call returned (unexpected)"))
        except Exception as e:
            facts.append(("node killed mid-call", f"{type(e).__name__} after {time.monotonic() - t:.1f} s"))
        facts.append(
            ("other host after the loss", f"answers in {per_call_ms(lambda: ray.get(b.ping.remote()), 5):.1f} ms")
        )

        # A node frozen mid-call (SIGSTOP: no RST, no FIN, like a hung machine).
        lc.add_host("c")
        c = Probe.options(resources={f"{HOST_RESOURCE_PREFIX}c": 0.01}).remote()
        pids = [ray.get(c.ping.remote())]
        pids += [p.process.pid for procs in lc.hosts["c"].all_processes.values() for p in procs]
        ref = c.sleep.remote(120)
        time.sleep(1)
        t = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            ray.get(ref, timeout=120)
            facts.append(("node frozen mid-call", "call returned (unexpected)"))
        except Exception as e:
            facts.append(("node frozen mid-call", f"{type(e).__name__} after {time.monotonic() - t:.1f} s"))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        lc.remove_host("c")

        # Clients that do not hold the token (other processes: Ray caches the token per process).
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        for name, extra in (
            ("client with a wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}),
            ("client without auth mode", {}),
            ("client in token mode with no token", {"RAY_AUTH_MODE": "token", "HOME": str(base / "nohome")}),
        ):
            try:
                r = subprocess.run(
                    [sys.executable, "-c", CLIENT, lc.address],
                    env={**clean, **extra},
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                lines = [x for x in r.stdout.splitlines() if x.startswith(("CONNECTED", "REFUSED", "AFTER"))]
                facts.append((name, " / ".join(lines)))
            except subprocess.TimeoutExpired:
                facts.append((name, "no answer within 120 s"))
    finally:
        t = time.monotonic()
        lc.shutdown()
        facts.append(("shutdown", f"{time.monotonic() - t:.1f} s"))
        time.sleep(1)
        facts.append(("Ray processes left after shutdown", str(len(ray_processes(lc.tmpdir)))))
    load = os.getloadavg()
    print(f"| fact | measured (load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {os.cpu_count()} cores) |")
    print("|---|---|")
    for k, v in facts:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
