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


class FakeStarter:
    """FAKE host side of a started spare (the real one, Host.start_spare,
    needs runsc and cgroups: tests/integration/test_started_spares.py)."""

    def __init__(self) -> None:
        self.started: list[dict] = []
        self.stopped: list[dict] = []

    async def start(self, spare, shape):
        assert (spare.path / "rootfs").is_dir()  # the root is made first
        handle = {"cid": spare.cid, "shape": shape, "alive": True}
        self.started.append(handle)
        return handle

    async def stop(self, handle) -> None:
        self.stopped.append(handle)


def started(tmp_path) -> tuple[Spares, FakeStarter]:
    fake = FakeStarter()
    return Spares(tmp_path, SYSTEM, lambda: new_container_id("abcdef12"), fake.start, fake.stop), fake


def alive(handle) -> bool:
    return handle["alive"]


def test_a_started_spare_becomes_the_bundle_named_by_its_own_id(tmp_path):
    s, fake = started(tmp_path)
    mounts = ("/",)
    assert anyio.run(s.take_started, mounts, "none", alive) is None
    anyio.run(s.refill, mounts, "none")
    assert len(fake.started) == spares_mod.PER_KEY and s.wanted(mounts, "none") == 0
    # Started spares are not roots for runs of another shape, nor of none.
    assert not s.take(mounts, tmp_path / "b") and s.wanted(mounts) == spares_mod.PER_KEY
    assert anyio.run(s.take_started, mounts, "host", alive) is None
    spare = anyio.run(s.take_started, mounts, "none", alive)
    assert spare is not None and spare.started in fake.started
    assert spare.path == tmp_path / spare.cid and (spare.path / "rootfs").is_dir()
    assert spare.cid == spare.started["cid"] and spare.cid not in s.names()
    assert s.wanted(mounts, "none") == 1 and not fake.stopped


def test_a_started_spare_whose_launcher_ended_is_stopped_not_taken(tmp_path):
    s, fake = started(tmp_path)
    anyio.run(s.refill, ("/",), "none")
    for handle in fake.started:
        handle["alive"] = False
    assert anyio.run(s.take_started, ("/",), "none", alive) is None
    assert sorted(h["cid"] for h in fake.stopped) == sorted(h["cid"] for h in fake.started)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]


def test_close_and_eviction_stop_what_was_started(tmp_path):
    s, fake = started(tmp_path)
    for i in range(spares_mod.MAX_KEYS + 1):
        anyio.run(s.refill, (f"/m{i}",), "none")
    # The oldest key's spares were evicted: stopped, their directories gone.
    assert {h["cid"] for h in fake.stopped} == {h["cid"] for h in fake.started[: spares_mod.PER_KEY]}
    anyio.run(s.close)
    assert sorted(h["cid"] for h in fake.stopped) == sorted(h["cid"] for h in fake.started)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]
    anyio.run(s.refill, ("/x",), "none")  # closed: nothing more is started
    assert len(fake.started) == (spares_mod.MAX_KEYS + 1) * spares_mod.PER_KEY


def test_a_start_that_fails_leaves_nothing(tmp_path):
    async def fail(spare, shape):
        raise OSError("no launcher here")

    s = Spares(tmp_path, SYSTEM, lambda: new_container_id("abcdef12"), fail, None)
    anyio.run(s.refill, ("/",), "none")
    assert anyio.run(s.take_started, ("/",), "none", alive) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)] and not s.names()
