"""The file tools: write_file / read_file of 4 KiB through the SDK's stdio
client, against the MCP floor (list_active, a tool that does nothing), the
same operations in-process (files.py alone, on a workspace image), and a raw `runsc run` (what
writing a file through a sandbox costs at least).

One `gvisor-mcp serve --pool-size 0` is started off the clock. Per
iteration, in this order: write_file, read_file, list_active, files.write +
files.read in this process on a scratch directory; every 10th iteration one
raw `runsc run` of `/bin/sh -c true` (the reference every benchmark prints
ratios against). Times are client-side call_tool round trips.

Target (issue 13): p50 under 5 ms for a 4 KiB read or write.

    .venv/bin/python benchmarks/bench_files.py [-n 200] [--no-write] [--json FILE]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

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
    verdict,
)

from gvisor_mcp import files, workspace  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "File tools over MCP stdio"
BIN = Path(sys.executable).with_name("gvisor-mcp")
SIZE = 4096
TARGET_MS = 5.0


def server_params(base: Path):  # type: ignore[no-untyped-def]
    from mcp import StdioServerParameters

    root = base / "server"
    return StdioServerParameters(
        command=str(BIN),
        args=[
            "serve",
            "--state-root",
            str(root),
            "--cgroup-parent",
            f"{CGROUP_PREFIX}-files",
            "--state-dir",
            str(root / "state"),
            "--pool-size",
            "0",
        ],
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "WARNING"},
    )


async def timed(client, tool: str, args: dict) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    r = await client.call_tool(tool, args)
    dt = time.perf_counter() - t
    if r.is_error:
        raise SystemExit(f"{tool} failed: {r.content[0].text}")
    return dt


async def bench(n: int) -> tuple[str, dict]:
    from mcp import Client

    base = fresh_base("files")
    raw = Raw(base, write_etc(base / "etc"))
    # In-process figures on a workspace image like the server's (ext4, loop-mounted).
    scratch = base / "scratch" / "t" / "named" / "bench"
    workspace.ensure(base / "scratch", scratch, 64, 1000, 1000, "kept")
    content = ("x" * 63 + "\n") * (SIZE // 64)
    data = content.encode()
    rows: dict[str, list[float]] = {k: [] for k in ("raw", "write", "read", "floor", "fwrite", "fread")}
    try:
        async with Client(server_params(base)) as c:
            for _ in range(20):  # warm-up: the workspace image is made and mounted, caches warm
                await timed(c, "write_file", {"path": "bench.txt", "content": content})
                await timed(c, "read_file", {"path": "bench.txt"})
                await timed(c, "list_active", {})
            raw.run()
            for i in range(n):
                rows["write"].append(await timed(c, "write_file", {"path": "bench.txt", "content": content}))
                rows["read"].append(await timed(c, "read_file", {"path": "bench.txt", "length": SIZE}))
                rows["floor"].append(await timed(c, "list_active", {}))
                with files.root(str(scratch)) as fd:
                    t = time.perf_counter()
                    files.write(fd, ("bench.txt",), data, uid=1000, gid=1000)
                    rows["fwrite"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    got = files.read(fd, ("bench.txt",), 0, SIZE)
                    rows["fread"].append(time.perf_counter() - t)
                    assert got.data == data
                if i % 10 == 0:
                    rows["raw"].append(raw.run())
    finally:
        workspace.release(scratch, remove=True)
        check_clean(
            TITLE,
            [(base / "server" / "runsc", base / "server" / "bundles"), (raw.root, None)],
            [f"{CGROUP_PREFIX}-files", RAW_CGROUP],
            base=base,
        )
        shutil.rmtree(base, ignore_errors=True)

    r = med(rows["raw"])

    def row(label: str, key: str) -> str:
        xs = rows[key]
        return f"| {label} | {ms(med(xs))} | {ms(p90(xs))} | {med(xs) / r:.3f} |"

    write_ms, read_ms, floor_ms = (med(rows[k]) * 1000 for k in ("write", "read", "floor"))
    load = os.getloadavg()
    lines = [
        f"{machine_line()}; n={n} (raw: {len(rows['raw'])}), interleaved; load average while it ran "
        f"{load[0]:.1f} / {load[1]:.1f} (1 / 5 min) on {os.cpu_count()} CPUs.",
        "",
        "| what | median ms | p90 ms | ratio to raw |",
        "|---|---:|---:|---:|",
        row("raw `runsc run` of `/bin/sh -c true` (reference: the least a sandboxed write costs)", "raw"),
        row(f"`write_file` {SIZE} B (atomic: temp + rename), call_tool round trip", "write"),
        row(f"`read_file` {SIZE} B, call_tool round trip", "read"),
        row("`list_active` (does nothing: the MCP stdio floor)", "floor"),
        row(f"`files.write` {SIZE} B in-process (no MCP)", "fwrite"),
        row(f"`files.read` {SIZE} B in-process (no MCP)", "fread"),
        "",
        f"Target: p50 under {TARGET_MS:g} ms for a 4 KiB write / read: "
        f"{verdict(write_ms < TARGET_MS)} ({write_ms:.1f} ms) / {verdict(read_ms < TARGET_MS)} ({read_ms:.1f} ms); "
        f"the MCP floor on this machine, measured alongside, was {floor_ms:.1f} ms. "
        f"What the file tools add above that floor: write +{write_ms - floor_ms:.1f} ms, read +{read_ms - floor_ms:.1f} ms.",
    ]
    metrics = {
        "n": n,
        "raw_ms": r * 1000,
        "write_ms": write_ms,
        "read_ms": read_ms,
        "floor_ms": floor_ms,
        "fwrite_ms": med(rows["fwrite"]) * 1000,
        "fread_ms": med(rows["fread"]) * 1000,
    }
    return "\n".join(lines), metrics


if __name__ == "__main__":
    bench_main(__doc__, TITLE, lambda n: bench(n))
