"""Spare bundles (sandbox/spares.py): a cold run's empty root made ahead,
taken with one rename, refilled off the event loop, bounded, and gone when
the Manager closes. The reaper's part runs in tests/integration (it needs a
Host, which needs runsc)."""

from __future__ import annotations

import itertools

import anyio

from gvisor_mcp.sandbox import spares as spares_mod
from gvisor_mcp.sandbox.ownership import new_container_id
from gvisor_mcp.sandbox.rootfs import make_root
from gvisor_mcp.sandbox.spares import PREFIX, Spares

SYSTEM = [("bin", "usr/bin"), ("usr", None)]


def tree(path):
    return sorted(str(p.relative_to(path)) + ("@" if p.is_symlink() else "") for p in path.rglob("*"))


def make(tmp_path) -> Spares:
    return Spares(tmp_path, SYSTEM, lambda: new_container_id("abcdef12"))


def test_a_spare_is_the_root_make_root_would_make(tmp_path):
    s = make(tmp_path)
    mounts = ("/workspace", "/workspace/src")
    assert not s.take(mounts, tmp_path / "b1")  # none yet: nothing done
    assert not (tmp_path / "b1").exists()
    anyio.run(s.refill, mounts)
    assert s.wanted(mounts) == 0 and len(s.names()) == spares_mod.PER_KEY
    assert s.take(mounts, tmp_path / "b1")
    make_root(tmp_path / "ref", list(mounts), SYSTEM)
    assert tree(tmp_path / "b1" / "rootfs") == tree(tmp_path / "ref")
    assert (tmp_path / "b1").stat().st_mode & 0o777 == 0o700
    assert s.wanted(mounts) == 1
    # Another set of mountpoints gets no spare of this one.
    assert not s.take(("/other",), tmp_path / "b2")


def test_close_removes_every_spare_and_stops_refills(tmp_path):
    s = make(tmp_path)
    anyio.run(s.refill, ("/",))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    anyio.run(s.close)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    anyio.run(s.refill, ("/",))
    assert not list(tmp_path.iterdir()) and s.wanted(("/",)) == 0


def test_spares_are_bounded_by_keys(tmp_path):
    s = make(tmp_path)
    for i in range(spares_mod.MAX_KEYS + 3):
        anyio.run(s.refill, (f"/m{i}",))
    on_disk = [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    assert len(on_disk) == spares_mod.MAX_KEYS * spares_mod.PER_KEY
    assert {p.name[len(PREFIX) :] for p in on_disk} == s.names()
    assert not s.take(("/m0",), tmp_path / "b")  # the oldest key went first
    assert s.take((f"/m{spares_mod.MAX_KEYS + 2}",), tmp_path / "b")


def test_a_spare_removed_behind_our_back_falls_back(tmp_path):
    s = make(tmp_path)
    anyio.run(s.refill, ("/",))
    for p in tmp_path.iterdir():
        p.rename(tmp_path / f"x{next(counter)}")
    assert not s.take(("/",), tmp_path / "b")
    assert not (tmp_path / "b").exists()


counter = itertools.count()
