"""The runsc client joins the run's own cgroup leaves before it execs runsc
(`--ignore-cgroups`; sandbox/runsc.py Launch): every runsc process of a run
lives in the leaf whose limits we wrote, the limits hold, the counters we
read still tell OOM from a kill and give the command's peak memory, and
what the sandbox sees of its memory and CPUs is measured here.

Runs on cgroup v1 (these machines) and v2 alike: the paths are read from
/proc/PID/cgroup either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox import (
    ContainerOptions,
    ContainerStatus,
    Manager,
    ResourceSpec,
    SandboxError,
)
from gvisor_mcp.sandbox.cgroups import Cgroup, detect_version
from gvisor_mcp.sandbox.spec import host_pids_limit

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import SpareManager, WarmManager, make_config, running_manager

pytestmark = pytest.mark.runsc

MiB = 1024 * 1024
OWNED = ("memory", "cpu", "pids")


@pytest.fixture(params=["cold", "warm", "spare"])
async def manager(request, sandbox_base):
    """As conftest's, plus cold runs served by started spares (spares.py):
    their leaf and launcher were made before the run, so the same checks
    (every process in the leaf, limits, OOM vs kill, peak memory) run on
    that path too."""
    wrap = {"cold": lambda m: m, "warm": WarmManager, "spare": SpareManager}[request.param]
    async with running_manager(make_config(sandbox_base)) as m:
        yield wrap(m)
    assert leftovers(sandbox_base) == {}


def sh(script: str, **res) -> ContainerOptions:
    return ContainerOptions(command=["/bin/sh", "-c", script], resources=ResourceSpec(**res))


def cgroups_of(pid: int) -> dict[str, str]:
    """controller (or "" for the v2 hierarchy) -> cgroup path, from /proc/PID/cgroup."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


async def started(manager, options: ContainerOptions, run_id: str, tg, results: dict) -> str:
    """Start `options` in the background (its result goes to `results`);
    its container id once the command runs."""

    async def run() -> None:
        results[run_id] = await manager.run(options, run_id=run_id)

    tg.start_soon(run)
    with anyio.fail_after(60):
        while True:
            c = manager.active_run(run_id)
            if c is not None and c.process is not None and (c.warm or (c.watch and c.watch.running_at)):
                return c.container_id
            await anyio.sleep(0.05)


async def test_every_runsc_process_of_a_run_lives_in_its_own_leaf(manager):
    """Client, gofer and sandbox all start in the leaf (memory, cpu, pids;
    a pooled sandbox's also in the freezer: pool.py); runsc made no cgroup
    of its own in any other hierarchy."""
    results: dict = {}
    async with anyio.create_task_group() as tg:
        cid = await started(manager, sh("sleep 60", timeout=120), "leaf-check", tg, results)
        run = manager.active_run("leaf-check")
        owned = (*OWNED, "freezer") if run.cgroup.freezer else OWNED
        assert run.warm or not run.cgroup.freezer  # a cold run gets no freezer leaf
        client = run.process.pid
        pids = [client, *children(client)]
        kinds = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] for p in pids}
        names = sorted(os.path.basename(k) for k in kinds.values())
        assert names == [b"runsc", b"runsc-gofer", b"runsc-sandbox"], kinds
        want = f"/{CGROUP_PARENT}/{cid}"
        for pid in pids:
            cgs = cgroups_of(pid)
            if detect_version() == 2:
                assert cgs[""] == want, (kinds[pid], cgs)
            else:
                assert all(cgs[c] == want for c in owned), (kinds[pid], cgs)
        if detect_version() == 1:
            others = [
                c.name
                for c in Path("/sys/fs/cgroup").iterdir()
                if c.name not in owned and not c.is_symlink() and (c / CGROUP_PARENT / cid).exists()
            ]
            assert others == [], f"runsc made cgroups in {others}"
        # The host pids limit (the safety net) is ours, and counts runsc's threads.
        cg = Cgroup(want, detect_version())
        pids_dir = cg._dir("pids")
        assert int((pids_dir / "pids.max").read_text()) == host_pids_limit(0)
        assert int((pids_dir / "pids.current").read_text()) >= len(pids)
        await manager.kill("leaf-check")
    assert results["leaf-check"].status is ContainerStatus.KILLED


HOST_MEMTOTAL = next(
    line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
)


async def test_meminfo_shows_the_hosts_memory_and_nproc_the_hosts_cpus(manager):
    """The default (report_memory_limit off): MemTotal is the host's, as in
    most containers; the limit holds all the same (the OOM tests)."""
    r = await manager.run(sh("grep MemTotal /proc/meminfo; nproc", memory_mb=300, cpus=0.5))
    assert r.exit_code == 0, r.summary()
    mem, cpus = r.stdout.decode().split("\n")[:2]
    assert mem.split()[1] == HOST_MEMTOTAL, mem
    # runsc gives the sandbox as many CPUs as its own process may use; the
    # CPU quota (0.5) throttles them, it does not hide them (as before).
    assert int(cpus) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("warm", [False, True])
async def test_with_report_memory_limit_meminfo_shows_the_limit(sandbox_base, warm):
    options = sh("grep MemTotal /proc/meminfo", memory_mb=300)
    async with Manager(make_config(sandbox_base, report_memory_limit=True)) as m:
        r = await (WarmManager(m) if warm else m).run(options)
    assert r.stdout.decode().split()[1:] == [str(300 * 1024), "kB"], r.stdout
    assert r.warm is warm
    assert leftovers(sandbox_base) == {}


async def test_without_prejoin_runsc_joins_the_leaf_itself(sandbox_base):
    """cgroup_prejoin=False (the behaviour before issue 18): the sandbox is
    in the leaf, the client is not, and runsc itself tells the sandbox the
    memory limit."""
    results: dict = {}
    async with Manager(make_config(sandbox_base, cgroup_prejoin=False)) as m:
        r = await m.run(sh("grep MemTotal /proc/meminfo", memory_mb=300))
        assert r.stdout.decode().split()[1] == str(300 * 1024), r.stdout
        async with anyio.create_task_group() as tg:
            cid = await started(m, sh("sleep 60", timeout=120), "old-way", tg, results)
            client = m.active_run("old-way").process.pid
            want = f"/{CGROUP_PARENT}/{cid}"
            key = "" if detect_version() == 2 else "memory"
            assert cgroups_of(client)[key] != want
            assert [cgroups_of(p)[key] for p in children(client)] == [want, want]  # gofer, sandbox
            await m.kill("old-way")
    assert results["old-way"].status is ContainerStatus.KILLED
    assert leftovers(sandbox_base) == {}


async def test_peak_memory_is_the_commands_plus_the_sandboxs_own(manager):
    """The leaf now also holds the runsc client (a few MiB): a 100 MiB
    allocation still reads as ~100 MiB plus the sandbox's own overhead."""
    idle = await manager.run(ContainerOptions(command=["true"], resources=ResourceSpec(memory_mb=256)))
    assert 0 < idle.peak_memory_bytes < 64 * MiB, idle.peak_memory_bytes
    r = await manager.run(
        ContainerOptions(
            command=["python3", "-c", "x = bytearray(100 << 20)"],
            resources=ResourceSpec(memory_mb=256, timeout=60),
        )
    )
    assert (r.status, r.exit_code) == (ContainerStatus.EXITED, 0), r.summary()
    assert 100 * MiB < r.peak_memory_bytes < 100 * MiB + 96 * MiB, r.peak_memory_bytes


async def test_oom_and_a_kill_of_a_memory_heavy_run_are_told_apart(manager):
    r = await manager.run(
        ContainerOptions(
            command=["python3", "-c", "x = bytearray(1 << 30)"],
            resources=ResourceSpec(memory_mb=96, timeout=60),
        )
    )
    assert r.status is ContainerStatus.OOM_KILLED and r.oom_killed, r.summary()
    assert r.peak_memory_bytes <= 96 * MiB * 1.01
    results: dict = {}
    async with anyio.create_task_group() as tg:
        cid = await started(
            manager,
            ContainerOptions(
                command=["python3", "-c", "import time; x = bytearray(60 << 20); time.sleep(60)"],
                resources=ResourceSpec(memory_mb=96, timeout=120),
            ),
            "heavy",
            tg,
            results,
        )
        cg = Cgroup(f"/{CGROUP_PARENT}/{cid}", detect_version())
        with anyio.fail_after(60):
            while cg.stats().peak_memory_bytes < 60 * MiB:
                await anyio.sleep(0.05)
        await manager.kill("heavy")
    r = results["heavy"]
    assert r.status is ContainerStatus.KILLED and not r.oom_killed, r.summary()
    assert r.peak_memory_bytes > 60 * MiB


async def test_cpu_quota_throttles_the_whole_sandbox(manager):
    """Busy loops under cpus=0.25: the kernel throttles the leaf, so the
    sandbox (the process that runs them) is in it and the quota holds."""
    results: dict = {}
    async with anyio.create_task_group() as tg:
        cid = await started(
            manager,
            sh("for i in 1 2 3 4; do (while :; do :; done) & done; wait", cpus=0.25, timeout=120),
            "busy",
            tg,
            results,
        )
        cg = Cgroup(f"/{CGROUP_PARENT}/{cid}", detect_version())
        with anyio.fail_after(60):
            while True:
                stat = dict(line.split() for line in (cg._dir("cpu") / "cpu.stat").read_text().splitlines())
                if int(stat["nr_throttled"]) > 0:
                    break
                await anyio.sleep(0.2)
        await manager.kill("busy")
    assert results["busy"].status is ContainerStatus.KILLED


async def test_a_launcher_that_cannot_join_fails_clearly_and_leaves_nothing(sandbox_base, monkeypatch):
    """A leaf that vanished before the client joined it (fault injected by
    pointing the join at a missing file): an infrastructure error naming
    the step, no command output, nothing left behind."""
    monkeypatch.setattr(Cgroup, "procs_files", lambda self: (f"/sys/fs/cgroup/nonexistent/{self.rel}/cgroup.procs",))
    async with Manager(make_config(sandbox_base)) as m:
        with pytest.raises(SandboxError, match="could not join the run's cgroup"):
            await m.run(ContainerOptions(command=["true"]))
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("how", ["spare", "warm"])
async def test_a_memory_limit_above_the_leafs_own_is_raised(sandbox_base, how):
    """A leaf made before its run with a lower memory limit (a spare
    launcher's, made with the Manager's default of 512 MiB; a pooled
    sandbox booted for a template without one): v1 refuses a memory limit
    above memsw's, so raising moves memsw first. Before, both runs failed
    with EINVAL ("could not prepare the sandbox" / "could not apply limits
    to a pooled sandbox")."""
    allocate = ["python3", "-c", "x = bytearray(600 << 20)"]
    big = ContainerOptions(command=allocate, resources=ResourceSpec(memory_mb=1024, timeout=60))
    async with Manager(make_config(sandbox_base)) as m:
        if how == "warm":
            template = ContainerOptions(command=allocate, resources=ResourceSpec(timeout=60))
            m.warm(template, 1)
            assert await m.wait_warm(template)
            r = await m.run(big)
        else:
            r = await SpareManager(m).run(big)
    assert (r.status, r.exit_code, r.warm) == (ContainerStatus.EXITED, 0, how == "warm"), r.summary()
    assert r.peak_memory_bytes > 600 * MiB
    assert leftovers(sandbox_base) == {}
