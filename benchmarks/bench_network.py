"""network=sandbox: cold and warm runs against `none` and raw runsc, and a 100 MB download through the proxy.

Rows, interleaved per iteration: raw `runsc run` of `true` (network none,
the reference), cold `Manager.run` with network none, cold with network
sandbox (both take started spares, spares.py: for sandbox, its namespaces
and proxy listener were made ahead; the teardown follows the answer), a warm
sandbox-mode claim from a pool of 1, and the namespace setup + teardown
alone. Then 100 MB downloaded inside a sandbox from the test internet's web
server (tests/internet.py): through the egress proxy, and "direct": the
same server process started inside the run's edge namespace, so gVisor's
stack talks to it with no proxy in between. The download figure is curl's
own time inside the sandbox (boot excluded), the median of n/4 runs (at
least 3) of each, interleaved. Writes docs/benchmarks.md section "network=sandbox".

    .venv/bin/python benchmarks/bench_network.py [-n 20] [--no-write] [--json FILE]
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.to_thread

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    RAW_CGROUP,
    Raw,
    bench_main,
    check_clean,
    fresh_base,
    machine_line,
    med,
    ms,
    p90,
    verdict,
)

from gvisor_mcp.network import EgressRules, NetworkConfig, NetworkService  # noqa: E402
from gvisor_mcp.network.netns import SlotAllocator, create  # noqa: E402
from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig, NetworkMode, ResourceSpec  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402
from tests import internet as test_internet  # noqa: E402

TITLE = "network=sandbox"
CGROUP = f"{CGROUP_PREFIX}-network"
SETTLE = 0.25
SIZE = 100 * 1024 * 1024


class DirectNetwork:
    """A sandbox namespace whose edge runs the web server itself: the
    baseline download, with no proxy between gVisor's stack and the server."""

    def __init__(self, ns, server: subprocess.Popen) -> None:
        self.ns, self.server = ns, server
        self.netns_path = ns.netns_path
        self.failure = None
        # No proxy variables: the command is told where the server is instead.
        self.env = {"DIRECT_URL": f"http://{ns.slot.edge}"}

    def start(self, run_id: str, egress: object) -> None:
        pass

    def report(self) -> None:
        return None

    async def wait_failed(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.server.terminate()
        await anyio.to_thread.run_sync(self.server.wait)
        self.ns.close()


class DirectProvider:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.slots = SlotAllocator("198.19.128.0/17")
        self.last: DirectNetwork | None = None

    async def open(self, container_id: str) -> DirectNetwork:
        ns = await anyio.to_thread.run_sync(create, self.slots.take())
        ns.take_listener().close()
        server = subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{os.getpid()}/fd/{ns.e_fd}",
                sys.executable,
                str(test_internet.SERVER),
                ns.slot.edge,
                str(self.cert),
                str(self.key),
            ],
            pass_fds=(ns.e_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # E has no lo (nothing in E ever talks to itself), so wait for the
        # listening socket in the server's /proc/PID/net/tcp instead of connecting.
        want = socket.inet_aton(ns.slot.edge)[::-1].hex().upper()  # /proc/net/tcp's spelling
        for _ in range(600):
            try:
                listening = f"{want}:0050 00000000:0000 0A" in Path(f"/proc/{server.pid}/net/tcp").read_text()
            except OSError:
                listening = False
            if listening or server.poll() is not None:
                break
            await anyio.sleep(0.05)
        if server.poll() is not None:
            ns.close()
            raise RuntimeError("the direct web server did not start")
        self.last = DirectNetwork(ns, server)
        return self.last


CURL = "curl -sS -o /dev/null -w '%{{size_download}} %{{time_total}}' {url}/bytes/{size}"


async def bench(n: int) -> tuple[str, dict]:
    load_before = _load()
    base = fresh_base("network")
    raw = Raw(base, write_etc(base / "etc"))
    internet = test_internet.start(base / "internet")

    def config(name: str) -> ManagerConfig:
        return ManagerConfig(
            bundle_base_dir=str(base / name / "bundles"),
            runsc_root=str(base / name / "runsc"),
            cgroup_parent=f"{CGROUP}-{name}",
        )

    rules = EgressRules(**internet.policy_egress())
    none_true = ContainerOptions(command=["true"])
    sb_true = ContainerOptions(command=["true"], network=NetworkMode.SANDBOX, egress=rules)
    raws, none_cold, sb_cold, sb_warm, ns_cycle, proxied, direct = [], [], [], [], [], [], []
    slots = SlotAllocator("198.19.64.0/18")
    try:
        async with (
            NetworkService(NetworkConfig(hosts=internet.hosts, system_dns=False)) as net,
            Manager(config("cold")) as none_m,
            Manager(config("sandbox"), network=net) as sb_m,
            Manager(config("warm"), network=net) as warm_m,
            Manager(
                config("direct"), network=DirectProvider(internet.workdir / "web.pem", internet.workdir / "web.key")
            ) as direct_m,
        ):
            warm_m.warm(sb_true, 1)
            raw.run()
            await none_m.run(none_true)
            await sb_m.run(sb_true)
            for _ in range(n):
                await warm_m.wait_warm(sb_true)
                await anyio.sleep(SETTLE)
                raws.append(await anyio.to_thread.run_sync(raw.run))
                for m, opts, out in ((none_m, none_true, none_cold), (sb_m, sb_true, sb_cold)):
                    t = time.perf_counter()
                    r = await m.run(opts)
                    out.append(time.perf_counter() - t)
                    assert r.exit_code == 0 and not r.warm, r.summary()
                t = time.perf_counter()
                r = await warm_m.run(sb_true)
                sb_warm.append(time.perf_counter() - t)
                assert r.exit_code == 0 and r.warm, r.summary()
                t = time.perf_counter()
                ns = await anyio.to_thread.run_sync(create, slots.take())
                ns.close()
                ns_cycle.append(time.perf_counter() - t)
            warm_m.warm(sb_true, 0)
            big = ResourceSpec(timeout=120, memory_mb=1024)
            for _ in range(max(3, n // 4)):
                for m, cmd, out in (
                    (sb_m, CURL.format(url="http://web.test", size=SIZE), proxied),
                    (direct_m, "curl --noproxy '*' " + CURL.format(url="$DIRECT_URL", size=SIZE)[5:], direct),
                ):
                    opts = ContainerOptions(
                        command=["/bin/sh", "-c", cmd], network=NetworkMode.SANDBOX, egress=rules, resources=big
                    )
                    r = await m.run(opts)
                    size, secs = r.stdout.decode().split()
                    assert r.exit_code == 0 and int(size) == SIZE, (r.summary(), r.stdout, r.stderr)
                    out.append(float(secs))
    finally:
        internet.stop()
        check_clean(
            TITLE,
            [(base / m / "runsc", base / m / "bundles") for m in ("cold", "sandbox", "warm", "direct")]
            + [(raw.root, None)],
            [f"{CGROUP}-{m}" for m in ("cold", "sandbox", "warm", "direct")] + [RAW_CGROUP],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)  # scratch (etc, raw bundles), checked clean above
    cold_ratio = med(sb_cold) / med(none_cold)
    warm_ratio = med(sb_warm) / med(raws)
    mbps_p, mbps_d = SIZE / med(proxied) / 1e6, SIZE / med(direct) / 1e6
    dl_ratio = mbps_p / mbps_d
    table = "\n".join(
        [
            f"{machine_line()}; n={n} each, interleaved; downloads n={len(proxied)} each. "
            f"Load average (1/5/15 min) before: {load_before}; after: {_load()} (a shared machine: other "
            "sessions ran test suites at the same time).",
            "",
            "| what | median ms | p90 ms | ratio |",
            "|---|---:|---:|---:|",
            f"| raw `runsc run` of `true`, network none (reference) | {ms(med(raws))} | {ms(p90(raws))} | 1.00 |",
            f'| cold `Manager.run(["true"])`, network none | {ms(med(none_cold))} | {ms(p90(none_cold))} | {med(none_cold) / med(raws):.2f} |',
            f"| cold, network sandbox (a spare's namespaces, made ahead, bound at its start) | {ms(med(sb_cold))} | {ms(p90(sb_cold))} | {med(sb_cold) / med(raws):.2f} |",
            f"| warm sandbox-mode claim (pool of 1) | {ms(med(sb_warm))} | {ms(p90(sb_warm))} | {warm_ratio:.2f} |",
            f"| namespace setup + teardown alone (S, E, veth, addresses, listener) | {ms(med(ns_cycle))} | {ms(p90(ns_cycle))} | |",
            "",
            "| 100 MB download inside the sandbox (curl's time) | median s | MB/s |",
            "|---|---:|---:|",
            f"| through the egress proxy (`http://web.test/...`) | {med(proxied):.2f} | {mbps_p:.0f} |",
            f"| direct: same server in the run's edge namespace, no proxy | {med(direct):.2f} | {mbps_d:.0f} |",
            "",
            f"Targets: cold sandbox <= 1.20x cold none: {verdict(cold_ratio <= 1.20)} ({cold_ratio:.2f}x); "
            f"warm sandbox <= 0.5x raw: {verdict(warm_ratio <= 0.5)} ({warm_ratio:.2f}x); "
            f"proxied download >= 0.5x direct: {verdict(dl_ratio >= 0.5)} ({dl_ratio:.2f}x).",
        ]
    )
    metrics = {
        "raw_ms": med(raws) * 1000,
        "none_ms": med(none_cold) * 1000,
        "sandbox_ms": med(sb_cold) * 1000,
        "warm_ms": med(sb_warm) * 1000,
        "netns_ms": med(ns_cycle) * 1000,
        "cold_ratio": cold_ratio,
        "warm_ratio": warm_ratio,
        "proxied_mbps": mbps_p,
        "direct_mbps": mbps_d,
        "download_ratio": dl_ratio,
        "n": n,
    }
    return table, metrics


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    bench_main(__doc__, TITLE, bench)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
