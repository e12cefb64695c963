"""The v1 freezer leaf of a pooled sandbox's cgroup, against a FAKE v1
tree in a temp directory (a mock, named as such: the kernel's freezer is
exercised for real by tests/integration/test_pool_freeze.py)."""

from __future__ import annotations

import pytest

from gvisor_mcp.sandbox.cgroups import Cgroup, freezer_available


def test_v1_freezer_leaf_is_made_and_joined_only_for_a_freezable_cgroup(tmp_path):
    """v1 a pooled sandbox's cgroup also gets a freezer leaf,
    which the launcher joins; a cold run's does not pay for one."""
    for c in ("memory", "cpu", "pids", "freezer"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("")
    assert freezer_available(1, tmp_path)
    assert not freezer_available(1, tmp_path / "nowhere")
    cold = Cgroup("/p/gm-cold", 1, root=tmp_path)
    cold._mkdirs_v1()
    assert not (tmp_path / "freezer" / "p" / "gm-cold").exists()
    assert not any(p.startswith(str(tmp_path / "freezer")) for p in cold.procs_files())
    with pytest.raises(FileNotFoundError):
        cold.thaw()  # what the reaper meets for a leaf never frozen: ignored there
    assert cold.freezer_state() is None
    pooled = Cgroup("/p/gm-pool", 1, root=tmp_path, freezer=True)
    pooled._mkdirs_v1()
    leaf = tmp_path / "freezer" / "p" / "gm-pool"
    assert leaf.is_dir()
    assert str(leaf / "cgroup.procs") in pooled.procs_files()
    pooled.freeze()
    assert pooled.freezer_state() == "FROZEN"  # a fake: the kernel would say FREEZING first
    pooled.thaw()
    assert pooled.freezer_state() == "THAWED"
    assert leaf in pooled.existing_dirs()
