"""The cgroup v2 path, against a FAKE cgroup tree in a temp directory.

This is a mock, named as such: these machines have cgroup v1 only, so the v2
file layout (memory.max, memory.peak, memory.events) is simulated with plain
files. The v1 path is exercised for real by the integration tests.
"""

from __future__ import annotations

import anyio

from gvisor_mcp.sandbox import ResourceSpec
from gvisor_mcp.sandbox.cgroups import Cgroup, detect_version, freezer_available, list_leaves


def fake_v2(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    return tmp_path


def test_v2_create_stats_remove(tmp_path):
    root = fake_v2(tmp_path)
    assert detect_version(root) == 2
    leaf = root / "gvisor-mcp" / "gm-abcdef12-000000000000"
    cg = Cgroup("/gvisor-mcp/gm-abcdef12-000000000000", 2, root=root)
    # A real kernel creates the interface files; in the fake, writing creates them.
    cg.create(ResourceSpec(cpus=0.5, memory_mb=64, max_pids=10))
    assert (leaf / "memory.max").read_text() == str(64 << 20)
    assert (leaf / "cpu.max").read_text() == "50000 100000"
    assert "+memory" in (root / "gvisor-mcp" / "cgroup.subtree_control").read_text()
    (leaf / "memory.peak").write_text("12345\n")
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    stats = cg.stats()
    assert (stats.peak_memory_bytes, stats.oom_kills) == (12345, 1)
    assert list_leaves("gvisor-mcp", 2, root=root) == {"gm-abcdef12-000000000000"}
    for f in leaf.iterdir():
        f.unlink()  # a real cgroupfs rmdir needs no unlinks
    assert anyio.run(cg.remove) == []
    assert not leaf.exists()


def test_v2_freeze_and_thaw_write_cgroup_freeze_and_read_cgroup_events(tmp_path):
    """v2 freezes the run's one leaf (`cgroup.freeze`); the kernel reports
    the outcome in `cgroup.events` ("frozen 1"), simulated here."""
    root = fake_v2(tmp_path)
    assert freezer_available(2, root)
    cg = Cgroup("/gvisor-mcp/gm-abcdef12-000000000001", 2, root=root, freezer=True)
    cg.create(ResourceSpec(memory_mb=64))
    leaf = root / "gvisor-mcp" / "gm-abcdef12-000000000001"
    assert cg.procs_files() == (str(leaf / "cgroup.procs"),)  # no second leaf to join on v2
    (leaf / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (leaf / "cgroup.freeze").write_text("0\n")
    assert cg.freezer_state() == "THAWED"
    cg.freeze()
    assert (leaf / "cgroup.freeze").read_text() == "1"
    assert cg.freezer_state() == "FREEZING"  # asked, the kernel not done yet
    (leaf / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    assert cg.freezer_state() == "FROZEN"
    cg.thaw()
    (leaf / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert (leaf / "cgroup.freeze").read_text() == "0"
    assert cg.freezer_state() == "THAWED"
