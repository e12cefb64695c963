"""What the store does to an unpacked tree, when the tree is hostile: links
planted at the paths the store reads and writes are never followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gvisor_mcp.images import tree


@pytest.fixture
def outside(tmp_path) -> Path:
    d = tmp_path / "host"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "passwd").write_text("host:x:0:0::/:/bin/sh\n")
    (d / "status").write_text("Package: secret\nStatus: install ok installed\nVersion: 1\n")
    return d


def fd(root: Path) -> int:
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY)


def test_finalize_adds_mountpoints_and_the_sandbox_user(tmp_path):
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    d = fd(root)
    try:
        changes = tree.finalize(d)
        assert tree.finalize(d) == []  # idempotent: nothing left to do
    finally:
        os.close(d)
    assert (root / "etc" / "passwd").read_text().endswith("sandbox:x:1000:1000:sandbox:/tmp:/bin/sh\n")
    assert (root / "etc" / "group").read_text() == "root:x:0:\nsandbox:x:1000:\n"
    for p in ("proc", "dev", "sys", "tmp", "run", "workspace", "var/tmp"):
        assert (root / p).is_dir()
    assert oct((root / "tmp").stat().st_mode & 0o7777) == "0o1777"
    assert any("mountpoint" in c for c in changes)


def test_an_image_that_already_has_uid_1000_keeps_its_own_user(tmp_path):
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("node:x:1000:1000::/home/node:/bin/sh\n")
    d = fd(root)
    try:
        tree.finalize(d)
    finally:
        os.close(d)
    assert (root / "etc" / "passwd").read_text() == "node:x:1000:1000::/home/node:/bin/sh\n"


def test_links_planted_where_the_store_writes_are_not_followed(tmp_path, outside):
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    os.symlink(outside / "etc" / "passwd", root / "etc" / "passwd")
    os.symlink(outside / "etc", root / "workspace")  # a mountpoint name taken by a link
    os.symlink(outside, root / "var")
    d = fd(root)
    try:
        tree.finalize(d)
    finally:
        os.close(d)
    assert (outside / "etc" / "passwd").read_text() == "host:x:0:0::/:/bin/sh\n"
    assert sorted(os.listdir(outside)) == ["etc", "status"] and os.listdir(outside / "etc") == ["passwd"]
    assert (root / "workspace").is_symlink() and (root / "etc" / "passwd").is_symlink()


def test_an_etc_that_is_a_link_is_left_alone(tmp_path, outside):
    root = tmp_path / "img"
    root.mkdir()
    os.symlink(outside / "etc", root / "etc")
    d = fd(root)
    try:
        tree.finalize(d)
    finally:
        os.close(d)
    assert os.listdir(outside / "etc") == ["passwd"]


def test_links_planted_where_the_store_reads_are_not_followed(tmp_path, outside):
    root = tmp_path / "img"
    (root / "var" / "lib" / "dpkg").mkdir(parents=True)
    os.symlink(outside / "status", root / "var" / "lib" / "dpkg" / "status")
    os.symlink(outside / "etc" / "passwd", root / "shadow-copy")
    d = fd(root)
    try:
        assert tree.installed_packages(d) is None
        info = tree.tree_info(d)
        assert tree.read_file(d, "shadow-copy") is None
    finally:
        os.close(d)
    assert info.size == 0  # links count as links, their targets are never read


def test_lookup_resolves_inside_the_image_only(tmp_path):
    root = tmp_path / "img"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "dash").write_text("#!")
    os.symlink("dash", root / "usr" / "bin" / "sh")
    os.symlink("usr/bin", root / "bin")
    os.symlink("/../../../../usr/bin", root / "up")  # `..` stops at the image root
    os.symlink("/etc/passwd", root / "hostpasswd")  # the host has it; the image does not
    d = fd(root)
    try:
        assert tree.has_shell(d)
        assert tree.lookup(d, "/up/dash") is not None
        assert tree.lookup(d, "/hostpasswd") is None
        os.symlink("loop", root / "loop")
        assert tree.lookup(d, "/loop") is None
    finally:
        os.close(d)


def test_digests_depend_on_content_not_on_time(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_text("same")
    os.utime(b / "d" / "f", (0, 0))
    da, db = fd(a), fd(b)
    try:
        assert tree.tree_info(da).digest == tree.tree_info(db).digest
        (b / "d" / "f").write_text("other")
        assert tree.tree_info(da).digest != tree.tree_info(db).digest
        os.chmod(b / "d" / "f", 0o600)
        (b / "d" / "f").write_text("same")
        assert tree.tree_info(da).digest != tree.tree_info(db).digest  # modes count
    finally:
        os.close(da)
        os.close(db)
