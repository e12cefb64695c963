"""Idle pooled sandboxes are frozen (cgroup freezer) and thawed before
anything talks to them (sandbox/pool.py), with real runsc: a claim after
the freeze runs its command as usual, kill and timeout of such a run are
honest, a closed Manager and a SIGKILLed one (reaped by the next) leave
nothing, not even the freezer leaf."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Manager, ResourceSpec
from gvisor_mcp.sandbox.cgroups import CGROUP_ROOT, Cgroup
from gvisor_mcp.sandbox.pool import WarmSandbox

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import make_config

pytestmark = [
    pytest.mark.runsc,
    pytest.mark.skipif(not (CGROUP_ROOT / "freezer" / "cgroup.procs").exists(), reason="no v1 freezer hierarchy"),
]

SH = ContainerOptions(command=["/bin/sh", "-c", "true"])
FREEZE_AFTER = 0.2


async def _until(predicate, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def _ready(m: Manager) -> list[WarmSandbox]:
    return [w for v in m.pool.ready.values() for w in v]


async def _frozen_pool(m: Manager, template: ContainerOptions, size: int = 1) -> list[WarmSandbox]:
    """Fill the pool and wait until every ready sandbox reads FROZEN in the kernel."""
    m.warm(template, size)
    assert await m.wait_warm(template, timeout=60), "the pool did not fill"
    await _until(lambda: all(w.container.cgroup.freezer_state() == "FROZEN" for w in _ready(m)))
    warm = _ready(m)
    assert len(warm) == size and all(w.container.frozen for w in warm)
    assert m.frozen_pooled() == size
    return warm


def _counted_right(m: Manager) -> bool:
    """The frozen gauge's count (Manager.frozen_pooled) is the ready sandboxes
    frozen now, once nothing taken out of the ready list is still on its way
    out (a claim thaws at once; a stop thaws before anything else)."""
    return m.frozen_pooled() == sum(w.container.frozen for w in _ready(m))


def _freezer_leaf(cg: Cgroup) -> Path:
    return CGROUP_ROOT / "freezer" / cg.rel.lstrip("/")


async def test_an_idle_pooled_sandbox_is_frozen_with_all_its_processes_and_a_claim_runs_normally(sandbox_base):
    async with Manager(make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER)) as m:
        (warm,) = await _frozen_pool(m, SH)
        cg = warm.container.cgroup
        # Every runsc process of the sandbox (client, sentry, gofer, stubs) is in the freezer leaf.
        in_leaf = set((_freezer_leaf(cg) / "cgroup.procs").read_text().split())
        pids = {str(p) for p in m._entered.host.runsc.process_pids(warm.container_id)}
        assert pids and pids <= in_leaf, (pids, in_leaf)
        # Frozen means stopped: no CPU used over a while.
        usage = Path("/sys/fs/cgroup/cpuacct") / cg.rel.lstrip("/") / "cpuacct.usage"
        if usage.exists():  # cpuacct joined only where it shares the cpu hierarchy
            before = int(usage.read_text())
            await anyio.sleep(0.5)
            assert int(usage.read_text()) == before
        r = await m.run(
            ContainerOptions(command=["/bin/sh", "-c", "read x; echo got $x; echo err >&2; exit 3"], stdin=b"hi\n")
        )
        assert r.warm and r.container_id == warm.container_id, r.summary()
        assert (r.status, r.exit_code, r.stdout, r.stderr) == (ContainerStatus.EXITED, 3, b"got hi\n", b"err\n")
        assert not warm.container.frozen
        assert _counted_right(m)  # the claimed one no longer counts (its refill may)
        m.warm(SH, 0)
    assert leftovers(sandbox_base) == {}


async def test_freeze_after_zero_never_freezes(sandbox_base):
    async with Manager(make_config(sandbox_base, pool_freeze_after=0)) as m:
        m.warm(SH, 1)
        assert await m.wait_warm(SH, timeout=60)
        await anyio.sleep(0.5)
        (warm,) = _ready(m)
        assert not warm.container.frozen and warm.container.cgroup.freezer_state() is None
        assert not _freezer_leaf(warm.container.cgroup).exists()  # not even made
        m.warm(SH, 0)
    assert leftovers(sandbox_base) == {}


@pytest.mark.parametrize("how", ["kill", "timeout"])
async def test_kill_and_timeout_of_a_run_claimed_after_the_freeze_are_honest(sandbox_base, how):
    sleep = ContainerOptions(command=["sleep", "300"], resources=ResourceSpec(timeout=2.0 if how == "timeout" else 0))
    async with Manager(make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER)) as m:
        (warm,) = await _frozen_pool(m, sleep)
        result = None

        async def call() -> None:
            nonlocal result
            result = await m.run(sleep, run_id="r1")

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await _until(lambda: m.active_run("r1") is not None)
                if how == "kill":
                    await anyio.sleep(0.5)
                    assert await m.kill("r1")
    assert result is not None and result.warm and result.container_id == warm.container_id
    want = ContainerStatus.KILLED if how == "kill" else ContainerStatus.TIMED_OUT
    assert result.status == want, result.summary()
    assert result.duration < 60
    assert leftovers(sandbox_base) == {}


async def test_a_manager_closed_with_frozen_sandboxes_leaves_nothing(sandbox_base):
    async with Manager(make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER)) as m:
        warm = await _frozen_pool(m, SH, size=2)
        leaves = [_freezer_leaf(w.container.cgroup) for w in warm]
        assert all(p.is_dir() for p in leaves)
    assert m.frozen_pooled() == 0
    left = leftovers(sandbox_base)
    assert left == {}, left
    assert not any(p.exists() for p in leaves)


async def test_a_sandbox_that_will_not_thaw_is_discarded_and_the_call_goes_cold(sandbox_base):
    async with Manager(make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER)) as m:
        (warm,) = await _frozen_pool(m, SH)
        c = warm.container

        def refuse_once() -> None:
            del c.cgroup.thaw  # the real one again: the discarded sandbox's stop thaws it
            raise OSError("thaw refused (test)")

        c.cgroup.thaw = refuse_once  # type: ignore[method-assign]
        r = await m.run(SH)
        assert not r.warm and r.container_id != c.container_id, r.summary()
        assert (r.status, r.exit_code) == (ContainerStatus.EXITED, 0)
        assert m.pool.hits == 0 and m.pool.misses == 1
        await _until(lambda: not c.cgroup.existing_dirs())
        assert c.torn_down and not c.frozen  # its stop thawed it after all
        assert _counted_right(m)
    assert leftovers(sandbox_base) == {}


def _processes_of(cid: str) -> list[str]:
    """`ps` lines of any process (runsc-sandbox, gofer, the runsc client) naming `cid`."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if cid in line]


async def test_a_frozen_sandbox_reaching_max_age_is_thawed_and_retired_and_the_pool_refills(sandbox_base):
    async with Manager(make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER)) as m:
        (warm,) = await _frozen_pool(m, SH)
        c, cid = warm.container, warm.container_id
        leaf = _freezer_leaf(c.cgroup)
        assert leaf.is_dir() and _processes_of(cid) and c.bundle.is_dir()
        # It reaches pool_max_age now: the keeper's own check retires it.
        warm.booted_at -= m.config.pool_max_age + 1
        m.pool.wake()
        # (A frozen sandbox stopped without a thaw would not get past this.)
        await _until(lambda: c.torn_down and not c.cgroup.existing_dirs() and not c.bundle.exists())
        assert not c.frozen and not leaf.exists()
        # Cleanly: thawed first, so its stub read the EOF and exited (1: the
        # waiting `read` failed); stopped unthawed, it would have been killed
        # (-9) after kill_grace, by runsc kill then teardown's thaw.
        assert c.process is not None and c.process.returncode == 1, c.process.returncode
        assert m.pool.hits == 0 and m.pool.misses == 0  # retired, not claimed
        listed = subprocess.run(
            ["runsc", f"--root={sandbox_base / 'runsc'}", "list", "-quiet"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert cid not in listed, listed
        assert _processes_of(cid) == []
        assert _counted_right(m)
        # The pool refills with a new sandbox, which idles and is frozen in turn.
        (fresh,) = await _frozen_pool(m, SH)
        assert fresh.container_id != cid
        m.warm(SH, 0)
    assert m.frozen_pooled() == 0
    assert leftovers(sandbox_base) == {}


def test_a_frozen_task_does_not_die_of_sigkill_until_thawed():
    """Why the reaper thaws first (cgroup v1 freezer, this kernel)."""
    cg = Cgroup(f"/{CGROUP_PARENT}/gm-{uuid.uuid4().hex[:12]}", 1, freezer=True)
    leaf = _freezer_leaf(cg)
    leaf.mkdir(parents=True)
    proc = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {leaf}/cgroup.procs && exec sleep 300"])
    try:
        for _ in range(500):
            if str(proc.pid) in (leaf / "cgroup.procs").read_text().split():
                break
            time.sleep(0.01)
        cg.freeze()
        for _ in range(500):
            if cg.freezer_state() == "FROZEN":
                break
            time.sleep(0.01)
        assert cg.freezer_state() == "FROZEN"
        os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert proc.poll() is None  # still there, frozen
        cg.thaw()
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        for _ in range(100):
            try:
                leaf.rmdir()
                break
            except OSError:
                time.sleep(0.02)


CHILD = textwrap.dedent(
    """
    import json, sys, anyio
    from gvisor_mcp.sandbox import Manager, ManagerConfig, ContainerOptions
    cfg = ManagerConfig(**json.loads(sys.argv[1]))
    async def main():
        async with Manager(cfg) as m:
            t = ContainerOptions(command=["/bin/sh", "-c", "true"])
            m.warm(t, 2)
            await m.wait_warm(t, timeout=120)
            while not all(w.container.frozen for v in m.pool.ready.values() for w in v):
                await anyio.sleep(0.05)
            guard = m._entered.host.thaw_guard.pid
            print("FROZEN", guard, *(w.container_id for v in m.pool.ready.values() for w in v), flush=True)
            await anyio.sleep(600)
    anyio.run(main)
    """
)


def exited(pid: int) -> bool:
    """Gone, or a zombie its new parent has not reaped (this machine's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("guard", ["alive", "killed too"])
async def test_a_sigkilled_managers_frozen_sandboxes_end_by_themselves_or_are_reaped_by_the_next(sandbox_base, guard):
    """Its thaw guard (thawguard.py) thaws them once the Manager's process is
    gone: their stubs read EOF and exit, as unfrozen ones do, leaving the
    leaves and bundles to the reaper. Without the guard (killed with it),
    they stay frozen until the next Manager's reaper thaws and removes them."""
    cfg = make_config(sandbox_base, pool_freeze_after=FREEZE_AFTER).model_dump(mode="json")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        word, guard_pid, *ids = child.stdout.readline().split()
        assert word == "FROZEN" and len(ids) == 2 and guard_pid.isdigit()
        if guard == "killed too":
            os.kill(int(guard_pid), signal.SIGKILL)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if guard == "alive":
            for _ in range(300):
                if not leftovers(sandbox_base).get("processes"):
                    break
                time.sleep(0.1)
            left = leftovers(sandbox_base)
            assert not left.get("processes"), left
            assert all(f"freezer/{cid}" in left["cgroups"] for cid in ids), left  # for the reaper
            assert exited(int(guard_pid)), "the guard exits once it has thawed them"
        else:
            # Their stubs' stdin is closed now, but frozen, they cannot see it.
            time.sleep(1.0)
            left = leftovers(sandbox_base)
            assert left.get("processes") and left.get("cgroups"), left
            assert all(f"freezer/{cid}" in left["cgroups"] for cid in ids), left
        async with Manager(make_config(sandbox_base)) as m:
            report = await m.reap_stale()
        assert sorted(r["container_id"] for r in report) == sorted(ids), report
        for _ in range(100):
            if leftovers(sandbox_base) == {}:
                break
            time.sleep(0.1)
        assert leftovers(sandbox_base) == {}
    finally:
        child.kill()
