"""Fair share: tenant B's `true` while tenant A holds its whole quota with long commands.

Issue 14, finding 7: with `--max-concurrent 4` and A's quota also 4, A's long
commands made B's `true` wait until one of them ended (p95 282 ms -> 45 s).
Admission now keeps a slot for a tenant below its fair share (jobs.FairGate).

One `gvisor-mcp serve --transport http --max-concurrent 4` (real HTTP on
127.0.0.1, bearer tokens for tenants a and b, both with max_concurrent 4;
the warm pool as shipped, 2 per tenant). Measured, all client-side round
trips of B's execute_command("true"):

1. cold boot: B's calls with max_pids=100, a shape no pool serves (each
   boots a sandbox): the median boot_ms the result reports;
2. idle: N of B's calls, nobody else running;
3. loaded: A starts 4 background `sleep 600` (its whole quota; 3 get a
   slot, the 4th waits for one) and keeps them; then N of B's calls.

Target: loaded p95 <= 2 x idle p95 + one cold boot. The machine's load
average is printed before and after (other processes share the CPUs).

    .venv/bin/python benchmarks/bench_fair.py [-n 20] [--no-write] [--json FILE]
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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
    ms,
    verdict,
)

TITLE = "Fair share under a saturating tenant"
BIN = Path(sys.executable).with_name("gvisor-mcp")
CAPACITY = 4
POLICY = """version: 1
quotas: {max_concurrent: 4, runs_per_minute: 1000000}
tenants:
  a: {}
  b: {}
"""


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(base: Path, tenant: str, policy: Path) -> str:
    r = subprocess.run(
        [str(BIN), "token", "add", tenant, "--policy", str(policy), "--tokens", str(base / "tokens.yaml")],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.strip()


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


async def call(client, **args) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    r = await client.call_tool("execute_command", {"command": "true", **args})
    dt = time.perf_counter() - t
    s = r.structured_content or {}
    if r.is_error or s.get("exit_code") != 0:
        raise RuntimeError(f"b's call failed: {r}")
    return dt, s


async def bench(n: int) -> tuple[str, dict]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    base = fresh_base("fair")
    policy = base / "policy.yaml"
    policy.write_text(POLICY)
    tokens = {t: token(base, t, policy) for t in ("a", "b")}
    port = free_port()
    cgroup = f"{CGROUP_PREFIX}-fair"
    err = (base / "server.err").open("wb")
    server = subprocess.Popen(
        [
            str(BIN),
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
            str(base / "state"),
            "--state-root",
            str(base),
            "--cgroup-parent",
            cgroup,
            "--max-concurrent",
            str(CAPACITY),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err,
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "WARNING"},
    )
    url = f"http://127.0.0.1:{port}/mcp"

    def client(tenant: str) -> Client:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {tokens[tenant]}"}, timeout=900)
        return Client(streamable_http_client(url, http_client=http))

    load_before = load()
    try:
        for _ in range(600):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None:
                raise RuntimeError((base / "server.err").read_text())
            await anyio.sleep(0.1)
        async with client("a") as a, client("b") as b:
            await call(b)  # b's host, session and pool come up off the clock
            cold = [(await call(b, max_pids=100))[1]["boot_ms"] / 1000 for _ in range(5)]
            await anyio.sleep(3)  # let the pool refill
            idle = [(await call(b))[0] for _ in range(n)]
            started = []
            for _ in range(CAPACITY):
                r = await a.call_tool("execute_command", {"command": "sleep 600", "background": True})
                started.append((r.structured_content or {})["result_id"])
            with anyio.fail_after(120):  # a holds every slot it is given
                while True:
                    active = (await a.call_tool("list_active", {})).structured_content["commands"]
                    if sum(1 for c in active if c["container_id"]) >= CAPACITY - 1:
                        break
                    await anyio.sleep(0.2)
            loaded, warm = [], 0
            for _ in range(n):
                dt, s = await call(b)
                loaded.append(dt)
                warm += bool(s.get("warm"))
            a_running = sum(
                1 for c in (await a.call_tool("list_active", {})).structured_content["commands"] if c["container_id"]
            )
            for rid in started:
                await a.call_tool("cancel_command", {"result_id": rid})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        err.close()
    load_after = load()
    check_clean(TITLE, [(base / "runsc", base / "bundles")], [cgroup], base=base)

    cold_boot = med(cold)
    target = 2 * p95(idle) + cold_boot
    ok = p95(loaded) <= target
    rows = [
        "| measure | value (ms) |",
        "|---|---|",
        f"| cold boot (median boot_ms of 5 unpooled calls) | {ms(cold_boot)} |",
        f"| B idle: p50 / p95 of {n} calls | {ms(med(idle))} / {ms(p95(idle))} |",
        f"| B while A holds {a_running} of {CAPACITY} slots with `sleep 600`: p50 / p95 | "
        f"{ms(med(loaded))} / {ms(p95(loaded))} ({warm} of {n} warm) |",
        f"| target: loaded p95 <= 2 x idle p95 + cold boot | {ms(p95(loaded))} <= {ms(target)}: {verdict(ok)} |",
    ]
    body = (
        f"{machine_line()}\n"
        f"Load average before / after: {load_before} -> {load_after} (2 CPUs, shared with other agents' runs).\n"
        f"`serve --transport http --max-concurrent {CAPACITY}`, tenants a and b with `max_concurrent: 4`.\n\n"
        + "\n".join(rows)
        + "\n\nBefore the fix (issue 14, same set-up): B's p95 went from 282 ms idle to 45 s, "
        "and some calls waited minutes, until one of A's commands ended."
    )
    metrics = {
        "cold_boot": cold_boot,
        "idle_p95": p95(idle),
        "loaded_p95": p95(loaded),
        "idle_p50": med(idle),
        "loaded_p50": med(loaded),
        "target": target,
        "ok": ok,
        "a_running": a_running,
    }
    return body, metrics


def main() -> None:
    from gvisor_mcp import logs

    args = common_args(__doc__.splitlines()[0]).parse_args()
    logs.configure("WARNING")
    body, metrics = anyio.run(bench, args.n)
    emit(args, TITLE, body, metrics)


if __name__ == "__main__":
    main()
