"""The cgroup v2 path of the pre-join (runsc.Launch) on a REAL cgroup2
hierarchy, where the host has one.

These machines are cgroup v1 for the controllers, but systemd's hybrid
layout mounts a controller-less cgroup2 at /sys/fs/cgroup/unified (on a
pure v2 host it is /sys/fs/cgroup itself). There the kernel's own v2 rules
apply to what the pre-join does: the leaf made by Cgroup._mkdirs_v2, the
launcher's one `echo 0 > cgroup.procs` moving the process that then execs
(and everything it starts) into the leaf, the leaf refusing removal while a
process is in it and Cgroup.remove waiting it out. The limits themselves
(memory.max, cpu.max, pids.max) need the controllers, which v1 holds here:
tests/unit/test_cgroups_v2.py covers their files on a FAKE tree.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox.cgroups import Cgroup
from gvisor_mcp.sandbox.runsc import Launch, launcher_argv

from ..conftest import CGROUP_PARENT


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, fstype, *_ = line.split()
        if fstype == "cgroup2" and mnt in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            return Path(mnt)
    return None


ROOT = cgroup2_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="no cgroup2 hierarchy mounted on this host")


@pytest.fixture
def leaf():
    assert ROOT is not None
    cg = Cgroup(f"/{CGROUP_PARENT}/gm-{uuid.uuid4().hex[:12]}", 2, root=ROOT)
    cg._mkdirs_v2()
    yield cg
    anyio.run(cg.remove)
    try:
        (ROOT / CGROUP_PARENT).rmdir()
    except OSError:
        pass  # another test's leaf is still there: it removes the parent


def test_the_launcher_joins_a_real_v2_leaf_and_its_children_stay_in_it(leaf, tmp_path):
    (procs,) = leaf.procs_files()
    argv = launcher_argv(Launch(join_cgroups=(procs,)), str(tmp_path / "log"))
    # What execs after the join (runsc in production) and a child it starts.
    r = subprocess.run(
        [*argv, "/bin/sh", "-c", "cat /proc/self/cgroup; sh -c 'cat /proc/self/cgroup'"],
        capture_output=True,
        text=True,
        check=True,
    )
    want = f"0::{leaf.rel}"
    v2_lines = [line for line in r.stdout.splitlines() if line.startswith("0::")]
    assert v2_lines == [want, want], r.stdout
    assert not (tmp_path / "log").exists()  # no launcher failure was logged


def test_remove_waits_for_the_last_process_to_leave_a_real_v2_leaf(leaf, tmp_path):
    (procs,) = leaf.procs_files()
    argv = launcher_argv(Launch(join_cgroups=(procs,)), str(tmp_path / "log"))
    proc = subprocess.Popen([*argv, "/bin/sleep", "0.5"])
    try:
        # The kernel refuses to remove a populated v2 cgroup; remove() retries.
        for _ in range(100):
            if Path(procs).read_text().strip():
                break
            anyio.run(anyio.sleep, 0.01)
        assert Path(procs).read_text().strip() == str(proc.pid)
        with pytest.raises(OSError):
            Path(leaf._dir()).rmdir()
        assert anyio.run(leaf.remove) == []
        assert not leaf._dir().exists()
    finally:
        proc.wait()


def test_a_missing_v2_leaf_fails_the_launcher_with_a_reason(tmp_path):
    assert ROOT is not None
    missing = ROOT / CGROUP_PARENT / "gm-not-made" / "cgroup.procs"
    log = tmp_path / "log"
    r = subprocess.run([*launcher_argv(Launch(join_cgroups=(str(missing),)), str(log)), "/bin/true"])
    assert r.returncode != 0
    assert "could not join the run's cgroup" in log.read_text()


def test_a_real_v2_leaf_freezes_and_thaws_its_processes(leaf, tmp_path):
    """The pool's idle freeze (pool.py) on v2: `cgroup.freeze` stops every
    process in the leaf, `cgroup.events` says so, and a thaw lets them on."""
    if not (leaf._dir() / "cgroup.freeze").exists():
        pytest.skip("this kernel's cgroup2 has no cgroup.freeze (< 5.2)")
    (procs,) = leaf.procs_files()
    argv = launcher_argv(Launch(join_cgroups=(procs,)), str(tmp_path / "log"))
    # Prints a line per wake-up: frozen, the file stops growing.
    out = tmp_path / "ticks"
    proc = subprocess.Popen([*argv, "/bin/sh", "-c", f"while :; do echo t >> {out}; sleep 0.02; done"])
    try:
        for _ in range(500):
            if out.exists() and out.stat().st_size > 0:
                break
            anyio.run(anyio.sleep, 0.01)
        leaf.freeze()
        for _ in range(500):
            if leaf.freezer_state() == "FROZEN":
                break
            anyio.run(anyio.sleep, 0.01)
        assert leaf.freezer_state() == "FROZEN"
        size = out.stat().st_size
        anyio.run(anyio.sleep, 0.3)
        assert out.stat().st_size == size  # nothing ran
        leaf.thaw()
        assert leaf.freezer_state() == "THAWED"
        for _ in range(500):
            if out.stat().st_size > size:
                break
            anyio.run(anyio.sleep, 0.01)
        assert out.stat().st_size > size
    finally:
        leaf.thaw()
        proc.kill()
        proc.wait()
