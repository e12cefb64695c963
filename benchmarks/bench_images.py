"""Store images: a cold and a warm run in a store image against raw `runsc run`
with the same root filesystem; and how long building and pulling take.

1. Build: `gvisor-mcp image build` of a small recipe (Essential + apt + jq)
   with mmdebstrap from the host's apt sources (one build; minutes).
2. Pull: the built image, made an OCI image with umoci off the clock, pushed
   with skopeo to a docker-registry this script starts on 127.0.0.1, then
   `gvisor-mcp image pull` into a fresh store, n/5 times (at least 3).
3. Runs: `Manager.run(["true"])` in the built image, read-only root as the
   policy gives it; cold, and warm (a pool of 1 kept on), interleaved with a
   raw `runsc run` of an equivalent bundle whose root is the same image
   directory.

    .venv/bin/python benchmarks/bench_images.py [-n 20] [--no-write] [--json FILE]
        [--reuse-build]   # skip step 1 when a previous run's image is still in the store
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CGROUP_PREFIX,
    Raw,
    check_cold_warm_clean,
    common_args,
    emit,
    fresh_base,
    machine_line,
    med,
    ms,
    p90,
    verdict,
)

from gvisor_mcp import logs  # noqa: E402
from gvisor_mcp.images.store import ImageStore  # noqa: E402
from gvisor_mcp.sandbox import ContainerOptions, Manager, ManagerConfig  # noqa: E402
from gvisor_mcp.sandbox.rootfs import write_etc  # noqa: E402

TITLE = "Store images"
CGROUP = f"{CGROUP_PREFIX}-images"
SETTLE = 0.25
BIN = Path(sys.executable).with_name("gvisor-mcp")
KEEP = Path("/var/cache/gvisor-mcp-bench/images")
"""The built image's state directory, kept for --reuse-build (outside BASE, which is wiped)."""


def cli(*args: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"gvisor-mcp {' '.join(args)} failed:\n{r.stderr}")
    return dt


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs"


def build(reuse: bool) -> tuple[ImageStore, float | None]:
    store = ImageStore(KEEP / "images")
    if reuse:
        try:
            store.get("bench")
            return store, None
        except LookupError:
            pass
    shutil.rmtree(KEEP, ignore_errors=True)
    dt = cli("image", "build", "bench", "--packages", "jq", "--state-dir", str(KEEP))
    return store, dt


class Registry:
    """docker-registry on 127.0.0.1 (plain HTTP), for the pull timings."""

    def __init__(self, base: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = base / "registry.yml"
        cfg.write_text(
            f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {base / 'data'}}}}}\n"
            f"http: {{addr: '127.0.0.1:{self.port}'}}\n"
        )
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("docker-registry did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pull_times(store: ImageStore, base: Path, count: int) -> tuple[list[float], int]:
    image = store.get("bench")
    layout = base / "oci"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:base"], check=True)
    with tarfile.open(base / "layer.tar", "w") as tar:
        for p in sorted(Path(image.rootfs).iterdir()):
            tar.add(p, arcname=p.name)
    subprocess.run(
        ["umoci", "raw", "add-layer", "--image", f"{layout}:base", "--tag", "1", str(base / "layer.tar")], check=True
    )
    (base / "layer.tar").unlink()
    gz = sum(f.stat().st_size for f in (layout / "blobs").rglob("*") if f.is_file())
    registry = Registry(base)
    try:
        ref = f"127.0.0.1:{registry.port}/bench/image:1"
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{ref}"], check=True
        )
        times = []
        for i in range(count):
            state = base / f"pull-{i}"
            times.append(cli("image", "pull", ref, "--insecure", "--name", "pulled", "--state-dir", str(state)))
            shutil.rmtree(state)
    finally:
        registry.stop()
    return times, gz


async def runs(store: ImageStore, base: Path, n: int) -> dict:
    image = store.get("bench")
    raw = Raw(base, write_etc(base / "etc"))
    true = ContainerOptions(command=["true"], rootfs=image.rootfs, read_only_rootfs=True)

    def config(name: str) -> ManagerConfig:
        return ManagerConfig(
            bundle_base_dir=str(base / name / "bundles"),
            runsc_root=str(base / name / "runsc"),
            cgroup_parent=f"{CGROUP}-{name}",
        )

    raws, cold, warm, boots = [], [], [], []
    try:
        async with Manager(config("cold")) as cold_m, Manager(config("warm")) as warm_m:
            warm_m.warm(true, 1)
            raw.run(true)
            await cold_m.run(true)
            for _ in range(n):
                await warm_m.wait_warm(true)
                await anyio.sleep(SETTLE)
                raws.append(await anyio.to_thread.run_sync(raw.run, true))
                t = time.perf_counter()
                r = await cold_m.run(true)
                cold.append(time.perf_counter() - t)
                boots.append(r.boot_duration)
                assert r.exit_code == 0 and not r.warm, r.summary()
                t = time.perf_counter()
                r = await warm_m.run(true)
                warm.append(time.perf_counter() - t)
                assert r.exit_code == 0 and r.warm, r.summary()
    finally:
        check_cold_warm_clean(TITLE, base, raw, CGROUP)
    return {"raws": raws, "cold": cold, "warm": warm, "boots": boots, "image": image}


def main() -> None:
    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--reuse-build", action="store_true", help="use the image a previous run built, if any")
    args = ap.parse_args()
    logs.configure("WARNING")
    load_before = load_line()
    store, build_s = build(args.reuse_build)
    base = fresh_base("images")
    pulls, gz = pull_times(store, base / "pull", max(3, args.n // 5))
    shutil.rmtree(base / "pull", ignore_errors=True)
    r = anyio.run(runs, store, base / "runs", args.n)
    shutil.rmtree(base, ignore_errors=True)  # scratch, checked clean by runs()
    load_after = load_line()
    raws, cold, warm, image = r["raws"], r["cold"], r["warm"], r["image"]
    ratio, wratio = med(cold) / med(raws), med(warm) / med(raws)
    size_mib = image.size / 2**20
    table = "\n".join(
        [
            f"{machine_line()}; n={args.n} runs each, interleaved; warm: pool of 1 kept on, refilled and settled "
            f"({SETTLE * 1000:.0f} ms) before each iteration. Load: {load_before} at the start, {load_after} at the end "
            "(a shared machine: other sessions were building and testing).",
            "",
            f"Image: `image build bench --packages jq` (Essential + apt + jq, {size_mib:.0f} MiB, {image.entries} entries, "
            f"{image.digest[:19]}...), read-only root, as a policy `{{store: bench}}` entry gives it.",
            "",
            "| what | median ms | p90 ms | ratio to raw |",
            "|---|---:|---:|---:|",
            f"| raw `runsc run` of `true`, root = the image directory (reference) | {ms(med(raws))} | {ms(p90(raws))} | 1.00 |",
            f'| `Manager.run(["true"])` in the store image (cold) | {ms(med(cold))} | {ms(p90(cold))} | {ratio:.2f} |',
            f"| of which boot (`boot_duration`) | {ms(med(r['boots']))} | {ms(p90(r['boots']))} | |",
            f'| `Manager.run(["true"])` in the store image (warm pool hit) | {ms(med(warm))} | {ms(p90(warm))} | {wratio:.2f} |',
            "",
            f"Targets: cold <= 1.10x raw: {verdict(ratio <= 1.10)} ({ratio:.2f}x); "
            f"warm <= 0.35x raw: {verdict(wratio <= 0.35)} ({wratio:.2f}x).",
            "",
            "| operation | seconds | |",
            "|---|---:|---|",
            (
                f"| `image build` (mmdebstrap, host apt sources; download + install + unpack + digest) | {build_s:.0f} | one build |"
                if build_s is not None
                else "| `image build` | (reused a previous build: --reuse-build) | |"
            ),
            f"| `image pull` from 127.0.0.1 ({gz / 2**20:.0f} MiB gzip, one layer; download + unpack + digest) | "
            f"{med(pulls):.1f} | median of {len(pulls)} (p90 {p90(pulls):.1f}) |",
        ]
    )
    metrics = {
        "raw_ms": med(raws) * 1000,
        "cold_ms": med(cold) * 1000,
        "warm_ms": med(warm) * 1000,
        "cold_ratio": ratio,
        "warm_ratio": wratio,
        "n": args.n,
        "build_s": build_s,
        "pull_s": med(pulls),
        "image_mib": size_mib,
    }
    emit(args, TITLE, table, metrics)


if __name__ == "__main__":
    main()
