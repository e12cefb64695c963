"""A 100 MB stdout flood (`head -c 100000000 /dev/zero`): wall time through
Manager.run (default output cap: bounded capture) and through the server's
execute_command, against raw `runsc run` with stdout to /dev/null; and the
peak RSS (VmHWM, reset with /proc/PID/clear_refs before the floods) of this
process and of the `gvisor-mcp serve` process.

Interleaved per iteration: three diagnostics (raw runsc with stdout to a
pipe drained by a plain blocking read loop, to a regular file, and to an
O_APPEND regular file: what the pipe and O_APPEND themselves cost), raw (Manager-equivalent bundle), Manager.run, raw
(policy-equivalent bundle: uid 1000, workspace, the policy's limits) to
/dev/null and to a regular file, execute_command.

Each row's file floor has the same limits as what it is compared with:
`Manager.run` against the Manager-equivalent bundle (no CPU quota), and
`execute_command` against the policy-equivalent one (`cpus: 1` in the
built-in policy: a flood is CPU-bound, so the quota alone moves it by
~20%). Every raw file is written in this benchmark's base directory, on the
same filesystem as the Manager's and the server's bundles (where their
output files live), and unlinked after its clock stops.

    .venv/bin/python benchmarks/bench_flood.py [-n 20] [--no-write] [--json FILE]
"""

from __future__ import annotations

import os
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
    Raw,
    bench_main,
    check_clean,
    fresh_base,
    machine_line,
    med,
    ms,
    p90,
    reset_peak_rss,
    status_kib,
    verdict,
)
from bench_mcp import TENANT, bench_policy, server_params, server_pid  # noqa: E402

from gvisor_mcp.policy import ExecRequest, loads, resolve  # noqa: E402
from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox.options import DEFAULT_MAX_OUTPUT  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "100 MB stdout flood"
SIZE = 100_000_000
SHELL = f"head -c {SIZE} /dev/zero"
CGROUP = f"{CGROUP_PREFIX}-flood"


def raw_to_pipe(raw: Raw, options: ContainerOptions) -> float:
    """Diagnostic: raw runsc with stdout to a pipe drained by a blocking read loop."""
    bundle, cid = raw.bundle(options)
    r, w = os.pipe()
    t = time.perf_counter()
    proc = raw.start(bundle, cid, w)
    os.close(w)
    got = 0
    while chunk := os.read(r, 1 << 20):
        got += len(chunk)
    proc.wait()
    dt = time.perf_counter() - t
    os.close(r)
    raw.finish(proc, bundle)
    assert got == SIZE, got
    return dt


def raw_to_file(raw: Raw, options: ContainerOptions, flags: int = 0) -> float:
    """Raw runsc with stdout to a regular file (no reader at all) in the
    benchmark's base directory: the same filesystem as the bundles. `flags`:
    os.O_APPEND for the diagnostic row (a cold run's file is O_APPEND, and
    gVisor's sentry fstats such a file before each write)."""
    bundle, cid = raw.bundle(options)
    path = raw.base / f"{cid}.out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600)
    t = time.perf_counter()
    proc = raw.start(bundle, cid, fd)
    os.close(fd)
    proc.wait()
    dt = time.perf_counter() - t
    raw.finish(proc, bundle)
    assert path.stat().st_size == SIZE
    path.unlink()
    return dt


async def bench(n: int) -> tuple[str, dict]:
    from mcp import Client

    base = fresh_base("flood")
    raw = Raw(base, write_etc(base / "etc"))
    flood = ContainerOptions(command=["head", "-c", str(SIZE), "/dev/zero"])
    policy_file = base / "policy.yaml"
    policy_file.write_text(bench_policy())
    ws = base / "raw-workspace"
    resolved = resolve(
        loads(policy_file.read_text()), ExecRequest(command=SHELL), TENANT, workspace_root=ws, session_id="bench"
    )
    assert resolved.workspace_path is not None
    resolved.workspace_path.mkdir(parents=True)
    os.chown(resolved.workspace_path, 1000, 1000)
    equiv = resolved.options

    manager = Manager(
        ManagerConfig(
            bundle_base_dir=str(base / "bundles"),
            runsc_root=str(base / "runsc"),
            cgroup_parent=CGROUP,
        )
    )
    rows: dict[str, list[float]] = {
        k: [] for k in ("raw", "ours", "raw_sh", "raw_sh_file", "server", "raw_pipe", "raw_file", "raw_append")
    }
    server_root = base / "server"
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(manager)
            client = await stack.enter_async_context(Client(server_params(base, "server", policy_file, 2)))
            spid = server_pid(server_root)
            # Warm-up, off the record.
            raw.run(flood, devnull_stdout=True)
            await manager.run(flood)
            rss_before = status_kib("self", "VmRSS")
            server_before = status_kib(spid, "VmRSS")
            reset_peak_rss("self")
            reset_peak_rss(spid)
            for _ in range(n):
                rows["raw_pipe"].append(await anyio.to_thread.run_sync(raw_to_pipe, raw, flood))
                rows["raw_file"].append(await anyio.to_thread.run_sync(raw_to_file, raw, flood))
                rows["raw_append"].append(await anyio.to_thread.run_sync(raw_to_file, raw, flood, os.O_APPEND))
                rows["raw"].append(await anyio.to_thread.run_sync(lambda: raw.run(flood, devnull_stdout=True)))
                t = time.perf_counter()
                r = await manager.run(flood)
                rows["ours"].append(time.perf_counter() - t)
                assert r.exit_code == 0 and r.stdout_bytes == SIZE and r.stdout_truncated, r.summary()
                assert len(r.stdout) <= DEFAULT_MAX_OUTPUT
                rows["raw_sh"].append(await anyio.to_thread.run_sync(lambda: raw.run(equiv, devnull_stdout=True)))
                rows["raw_sh_file"].append(await anyio.to_thread.run_sync(raw_to_file, raw, equiv))
                t = time.perf_counter()
                res = await client.call_tool("execute_command", {"command": SHELL})
                rows["server"].append(time.perf_counter() - t)
                s = res.structured_content or {}
                assert not res.is_error and s.get("exit_code") == 0 and s.get("stdout_bytes") == SIZE, res
            hwm = status_kib("self", "VmHWM")
            server_hwm = status_kib(spid, "VmHWM")
    finally:
        check_clean(
            TITLE,
            [(base / "runsc", base / "bundles"), (server_root / "runsc", server_root / "bundles"), (raw.root, None)],
            [CGROUP, f"{CGROUP_PREFIX}-server", RAW_CGROUP],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)

    def mbps(xs: list[float]) -> str:
        return f"{SIZE / med(xs) / 1e6:.0f}"

    ratio = med(rows["raw"]) / med(rows["ours"])  # throughput ratio
    fratio = med(rows["raw_file"]) / med(rows["ours"])  # against raw runsc writing a regular file
    aratio = med(rows["raw_append"]) / med(rows["ours"])  # diagnostic: the same, O_APPEND as ours
    sratio = med(rows["raw_sh"]) / med(rows["server"])
    # The MCP row against the regular-file floor with its own limits (the
    # policy's, cpus: 1 among them; its warm pool's stdout is a file too) ...
    sfratio = med(rows["raw_sh_file"]) / med(rows["server"])
    # ... and, as printed before, against the Manager-equivalent file floor (no CPU quota).
    sfratio_plain = med(rows["raw_file"]) / med(rows["server"])
    server_mb = server_hwm / 1024
    table = "\n".join(
        [
            f"{machine_line()}; n={n} each, interleaved; `{SHELL}`; Manager cap "
            f"{DEFAULT_MAX_OUTPUT // 2**20} MiB per stream (default), server policy `max_output: 10MiB`.",
            "",
            "| what | median ms | p90 ms | MB/s | throughput vs raw |",
            "|---|---:|---:|---:|---:|",
            f"| raw `runsc run`, stdout to /dev/null (reference) | {ms(med(rows['raw']))} | {ms(p90(rows['raw']))} | {mbps(rows['raw'])} | 1.00 |",
            f"| diagnostic: raw `runsc run`, stdout to a regular file | {ms(med(rows['raw_file']))} | {ms(p90(rows['raw_file']))} | {mbps(rows['raw_file'])} | {med(rows['raw']) / med(rows['raw_file']):.2f} |",
            f"| diagnostic: raw `runsc run`, stdout to an `O_APPEND` regular file (as a cold run's) | {ms(med(rows['raw_append']))} | {ms(p90(rows['raw_append']))} | {mbps(rows['raw_append'])} | {med(rows['raw']) / med(rows['raw_append']):.2f} |",
            f"| diagnostic: raw `runsc run`, stdout to a pipe drained by a blocking 1 MiB `os.read` loop | {ms(med(rows['raw_pipe']))} | {ms(p90(rows['raw_pipe']))} | {mbps(rows['raw_pipe'])} | {med(rows['raw']) / med(rows['raw_pipe']):.2f} |",
            f"| `Manager.run` (stdout captured, bounded) | {ms(med(rows['ours']))} | {ms(p90(rows['ours']))} | {mbps(rows['ours'])} | {ratio:.2f} |",
            f"| raw `runsc run` of `/bin/sh -c '{SHELL}'` (policy-equivalent bundle: its limits, `cpus: 1` among them), stdout to /dev/null | {ms(med(rows['raw_sh']))} | {ms(p90(rows['raw_sh']))} | {mbps(rows['raw_sh'])} | 1.00 |",
            f"| the same, stdout to a regular file (`execute_command`'s file floor) | {ms(med(rows['raw_sh_file']))} | {ms(p90(rows['raw_sh_file']))} | {mbps(rows['raw_sh_file'])} | {med(rows['raw_sh']) / med(rows['raw_sh_file']):.2f} |",
            f"| `execute_command` through MCP stdio (output stored to the result store) | {ms(med(rows['server']))} | {ms(p90(rows['server']))} | {mbps(rows['server'])} | {sratio:.2f} |",
            "",
            "| peak RSS (VmHWM over all floods) | MiB | before the floods (VmRSS) |",
            "|---|---:|---:|",
            f"| this benchmark process (Manager.run) | {hwm / 1024:.1f} | {rss_before / 1024:.1f} |",
            f"| the `gvisor-mcp serve` process (execute_command) | {server_mb:.1f} | {server_before / 1024:.1f} |",
            "",
            f"Targets: `Manager.run` >= 1.0x the throughput of raw runsc writing a regular file (the floor for "
            f"anything that keeps the bytes): {verdict(fratio >= 1.0)} ({fratio:.2f}x; {aratio:.2f}x of raw to an "
            f"`O_APPEND` file, a diagnostic), `execute_command` "
            f"{verdict(sfratio >= 1.0)} ({sfratio:.2f}x of the policy-equivalent file floor; "
            f"{sfratio_plain:.2f}x of the Manager-equivalent one, which has no CPU quota); "
            f"flood >= 0.8x raw to /dev/null: "
            f"Manager.run {verdict(ratio >= 0.8)} ({ratio:.2f}x), "
            f"execute_command {verdict(sratio >= 0.8)} ({sratio:.2f}x); server peak RSS < 150 MB: "
            f"{verdict(server_hwm * 1024 < 150e6)} ({server_hwm * 1024 / 1e6:.0f} MB).",
        ]
    )
    metrics = {
        "n": n,
        "raw_ms": med(rows["raw"]) * 1000,
        "ours_ms": med(rows["ours"]) * 1000,
        "server_ms": med(rows["server"]) * 1000,
        "raw_pipe_ms": med(rows["raw_pipe"]) * 1000,
        "raw_file_ms": med(rows["raw_file"]) * 1000,
        "raw_append_ms": med(rows["raw_append"]) * 1000,
        "raw_sh_ms": med(rows["raw_sh"]) * 1000,
        "raw_sh_file_ms": med(rows["raw_sh_file"]) * 1000,
        "throughput_ratio": ratio,
        "server_throughput_ratio": sratio,
        "file_ratio": fratio,
        "append_ratio": aratio,
        "server_file_ratio": sfratio,
        "server_plain_file_ratio": sfratio_plain,
        "bench_hwm_mib": hwm / 1024,
        "server_hwm_mib": server_mb,
        "server_hwm_mb": server_hwm * 1024 / 1e6,
    }
    return table, metrics


def main() -> None:
    bench_main(__doc__, TITLE, bench)


if __name__ == "__main__":
    main()
