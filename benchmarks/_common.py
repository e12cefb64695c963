"""What every benchmark shares: the raw-runsc reference, statistics, the
machine line, /proc readings (RSS, PSS, peak RSS) and the leftover check.

The reference is always a raw `runsc run` of a bundle equivalent to what the
Manager writes for the same options (same image, limits, mounts, user), with
the Manager's own runsc command line, its bundle written off the clock; it is
measured in the same run, interleaved with what it is the reference for.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:  # a plain checkout without `pip install -e .`
    sys.path.insert(1, str(SRC))

from gvisor_mcp.sandbox import ContainerOptions, ManagerConfig, NetworkMode, build_spec  # noqa: E402
from gvisor_mcp.sandbox.rootfs import host_system_entries, make_root  # noqa: E402
from gvisor_mcp.sandbox.runsc import Runsc  # noqa: E402

BASE = Path("/run/gvisor-mcp-bench")
"""Everything a benchmark creates lives under here (tests use /run/gvisor-mcp-test)."""
CGROUP_PREFIX = "gvisor-mcp-bench"
RAW_CGROUP = f"{CGROUP_PREFIX}-raw-{os.getpid()}"
"""Per process: other checkouts' benchmarks on the same host use the same prefix."""
RUNSC = shutil.which("runsc") or "runsc"


# --- the raw reference ----------------------------------------------------


class Raw:
    """Raw `runsc run` of bundles equivalent to the Manager's, under `base`."""

    def __init__(self, base: Path, etc: Path) -> None:
        self.base = base
        self.etc = etc
        self.root = base / "raw-root"
        self.system = host_system_entries()

    def bundle(self, options: ContainerOptions | None = None) -> tuple[Path, str]:
        """Write a bundle for `options` (default: `true` with the Manager's
        default resources), as the Manager would, but let runsc make the cgroup."""
        options = options or ContainerOptions(command=["true"])
        cid = f"raw-{uuid.uuid4().hex[:12]}"
        bundle = self.base / "raw" / cid
        bundle.mkdir(parents=True)
        make_root(
            bundle / "rootfs",
            [m.destination for m in options.extra_mounts] + [options.workdir],
            self.system,
        )
        res = options.resources.merged_over(ManagerConfig().default_resources)
        spec = build_spec(
            options,
            root_path=str(bundle / "rootfs"),
            etc_dir=str(self.etc),
            cgroups_path=f"/{RAW_CGROUP}/{cid}",
            resources=res,
        )
        (bundle / "config.json").write_text(json.dumps(spec))
        return bundle, cid

    def argv(self, bundle: Path, cid: str) -> list[str]:
        """Exactly the command line the Manager's runsc wrapper builds (so the
        reference follows any flag the Manager adds), on this root."""
        runsc = Runsc(RUNSC, str(self.root), ManagerConfig().platform)
        return runsc.run_argv(cid, str(bundle), NetworkMode.NONE, str(bundle / "runsc.log"))

    def start(self, bundle: Path, cid: str, stdout: int | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(bundle, cid),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=bundle,
        )

    def finish(self, proc: subprocess.Popen, bundle: Path) -> None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"raw runsc failed ({proc.returncode}): {err.decode(errors='replace')}")
        shutil.rmtree(bundle)

    def run(self, options: ContainerOptions | None = None, *, devnull_stdout: bool = False) -> float:
        """One timed `runsc run` (bundle written off the clock); seconds."""
        bundle, cid = self.bundle(options)
        out = subprocess.DEVNULL if devnull_stdout else None
        t = time.perf_counter()
        proc = self.start(bundle, cid, out)
        _, err = proc.communicate()
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"raw runsc failed ({proc.returncode}): {err.decode(errors='replace')}")
        shutil.rmtree(bundle)
        return dt

    def parallel(self, count: int, options: ContainerOptions | None = None) -> float:
        """`count` runs launched at once (bundles written off the clock); wall seconds."""
        bundles = [self.bundle(options) for _ in range(count)]
        t = time.perf_counter()
        procs = [self.start(b, c, subprocess.DEVNULL) for b, c in bundles]
        for p in procs:
            p.wait()
        dt = time.perf_counter() - t
        for p, (b, _) in zip(procs, bundles, strict=True):
            self.finish(p, b)
        return dt


# --- statistics and the machine line ------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, int(round(len(s) * 0.9)) - 1)]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def runsc_version() -> str:
    out = subprocess.run([RUNSC, "--version"], capture_output=True, text=True).stdout
    return (out.splitlines() or ["runsc version ?"])[0]


def code_version() -> str:
    """The commit benchmarked, and whether src/ had uncommitted changes."""
    repo = SRC.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "code: unknown"
    return f"code {head}" + (" + uncommitted changes in src/" if dirty else "")


def machine_line() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
        f"{mem:.0f} GiB RAM, kernel {platform.release()}, Python {platform.python_version()}; "
        f"{runsc_version()} (platform systrap); {code_version()}; {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --- /proc ----------------------------------------------------------------


def status_kib(pid: int | str, field: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...), in KiB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kib(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cmdline(pid: int | str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def pids_matching(*needles: str) -> list[int]:
    """Processes whose command line contains every needle (as a substring of one argument)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        args = cmdline(entry)
        if args and all(any(n in a for a in args) for n in needles):
            out.append(int(entry))
    return out


def runsc_processes(root: Path) -> list[int]:
    """Host processes of runsc (client, sandbox, gofer) using `root`."""
    return pids_matching(f"--root={root}")


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU seconds used by this process and everything it starts from now on
    (MCP servers and the runsc processes they start), through a cpuacct
    cgroup this process joins: runsc processes started with the pre-join move
    themselves only into their run's memory/cpu/pids leaves (v1), so they
    stay counted here. None (`why` says) without a v1 cpuacct hierarchy."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.why = ""
        acct = Path("/sys/fs/cgroup/cpuacct")
        if not (acct / "cpuacct.usage").exists():
            self.why = "no v1 cpuacct hierarchy on this host"
            return
        d = acct / f"{CGROUP_PREFIX}-cpu-{os.getpid()}"
        try:
            d.mkdir(exist_ok=True)
            (d / "cgroup.procs").write_text("0")
        except OSError as e:
            self.why = f"cannot join a cpuacct cgroup: {e}"
            return
        self.dir = d

    def seconds(self) -> float | None:
        return None if self.dir is None else int((self.dir / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        """Leave and remove the cgroup (children still in it keep it until they exit)."""
        if self.dir is None:
            return
        (self.dir.parent / "cgroup.procs").write_text("0")
        for _ in range(50):
            try:
                self.dir.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        self.dir = None


def newest_leaf_frozen(parent: str) -> bool:
    """Whether the newest run cgroup under `parent` (v1 freezer) is frozen:
    a server's pool claims its newest sandbox first (pool.WarmPool.claim),
    so this says, close enough, whether the next warm call thaws one."""
    d = Path("/sys/fs/cgroup/freezer") / parent
    try:
        leaves = sorted((p for p in d.iterdir() if p.is_dir()), key=lambda p: p.stat().st_ctime_ns)
        return bool(leaves) and (leaves[-1] / "freezer.state").read_text().strip() == "FROZEN"
    except OSError:
        return False


# --- cleanup --------------------------------------------------------------


def leftovers(root: Path, bundles: Path | None, cgroup_parents: list[str]) -> dict[str, list[str]]:
    """What a finished benchmark must not leave: containers in `runsc --root
    ROOT list`, runsc processes on ROOT (runsc-sandbox, gofer, client),
    bundles, cgroup leaves."""
    out: dict[str, list[str]] = {}
    if root.exists():
        r = subprocess.run([RUNSC, f"--root={root}", "list", "-quiet"], capture_output=True, text=True)
        ids = r.stdout.split()
        if ids:
            out["runsc list"] = ids
    procs = runsc_processes(root)
    if procs:
        out["processes"] = [" ".join(cmdline(p))[:120] for p in procs]
    if bundles is not None and bundles.exists():
        left = [n for n in os.listdir(bundles) if not n.startswith(".")]
        if left:
            out["bundles"] = left
    for parent in cgroup_parents:
        for ctl in Path("/sys/fs/cgroup").iterdir():
            d = ctl / parent
            if ctl.is_symlink() or not d.is_dir():
                continue
            leaves = [p.name for p in d.iterdir() if p.is_dir()]
            if leaves:
                out.setdefault("cgroups", []).extend(f"{ctl.name}/{parent}/{x}" for x in leaves)
    return out


def remove_cgroup_parents(parents: list[str]) -> None:
    """rmdir the (empty) parent cgroups a benchmark created."""
    for parent in parents:
        for ctl in Path("/sys/fs/cgroup").iterdir():
            d = ctl / parent
            if not ctl.is_symlink() and d.is_dir():
                try:
                    d.rmdir()
                except OSError:
                    pass


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (e.g. a workspace image left mounted)."""
    out = []
    prefix = str(path).rstrip("/") + "/"
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                out.append(point)
    except OSError:
        pass
    return out


def check_clean(
    what: str, roots: list[tuple[Path, Path | None]], cgroup_parents: list[str], base: Path | None = None
) -> None:
    """Fail loudly when a benchmark left anything behind; `roots` pairs each
    runsc root with its bundle directory (or None); `base`: no mount may be
    left under it either."""
    problems: dict[str, dict] = {}
    if base is not None and mounts_under(base):
        problems["mounts"] = {"left": mounts_under(base)}
    for root, bundles in roots:
        left = leftovers(root, bundles, [])
        if left:
            problems[str(root)] = left
    left = leftovers(Path("/nonexistent"), None, cgroup_parents)
    if left:
        problems["cgroups"] = left
    if problems:
        raise SystemExit(f"{what}: left behind: {json.dumps(problems, indent=1)}")
    remove_cgroup_parents(cgroup_parents)


def fresh_base(name: str) -> Path:
    base = BASE / name
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    return base


def emit(args, title: str, body: str, metrics: dict, extra_sections: list[tuple[str, str]] = ()) -> None:  # type: ignore[no-untyped-def]
    """Print the section(s), write them to docs/benchmarks.md unless --no-write,
    and dump the metrics as JSON for run_all when --json is given."""
    from _report import write_section

    print(f"## {title}\n\n{body}\n")
    for t, b in extra_sections:
        print(f"## {t}\n\n{b}\n")
    if not args.no_write:
        write_section(title, body)
        for t, b in extra_sections:
            write_section(t, b)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))


def common_args(description: str, default_n: int = 20):  # type: ignore[no-untyped-def]
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("-n", type=int, default=default_n, help=f"runs per row (default {default_n})")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here (run_all uses it)")
    return ap


def bench_main(doc: str, title: str, bench) -> None:  # type: ignore[no-untyped-def]
    """A benchmark script's main: parse -n/--no-write/--json, run `bench(n)`, emit its table."""
    import anyio

    from gvisor_mcp import logs

    args = common_args(doc.splitlines()[0]).parse_args()
    logs.configure("WARNING")
    table, metrics = anyio.run(bench, args.n)
    emit(args, title, table, metrics)


def check_cold_warm_clean(title: str, base: Path, raw: Raw, cgroup: str, extra: tuple[str, ...] = ()) -> None:
    """check_clean for a benchmark with a cold and a warm Manager (and the
    `extra` ones) under `base` plus the raw reference; then remove `base`."""
    names = ("cold", "warm", *extra)
    check_clean(
        title,
        [(base / m / "runsc", base / m / "bundles") for m in names] + [(raw.root, None)],
        [*(f"{cgroup}-{m}" for m in names), RAW_CGROUP],
        base=base,
    )
    shutil.rmtree(base, ignore_errors=True)


def server_pid(root: Path) -> int:
    """The `gvisor-mcp serve` process whose arguments name `root`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            args = cmdline(entry)
            if "serve" in args and str(root) in args:
                return int(entry)
    raise RuntimeError(f"no gvisor-mcp serve process for {root}")
