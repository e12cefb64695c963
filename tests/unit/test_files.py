"""files.py on a real filesystem: what a hostile sandbox can plant, the
server never follows, blocks on, or leaves half-written.

Runs with openat2 and again with the O_NOFOLLOW walk (the fallback for
kernels without openat2), forced by hand.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from gvisor_mcp import files
from gvisor_mcp.files import FileError, parse

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown and mounts need root")


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    if request.param == "openat2":
        if not files.openat2_available():
            pytest.skip("no openat2 on this kernel")
    else:
        monkeypatch.setattr(files, "_openat2_works", False)
    return request.param


@pytest.fixture
def tree(tmp_path: Path, resolver) -> Path:
    """A workspace with everything a command could plant, and a secret outside it."""
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_bytes(b"hello\n")
    secret = tmp_path / "secret"
    secret.write_text("outside\n")
    os.symlink("/etc", root / "etc")
    os.symlink("/etc/passwd", root / "passwd")
    os.symlink("/proc/self/root", root / "procroot")
    os.symlink(str(secret), root / "secret")
    os.symlink("../secret", root / "sub" / "up")
    os.mkfifo(root / "fifo")
    return root


def kind_of_error(fn, *a, **kw) -> str:
    with pytest.raises(FileError) as e:
        fn(*a, **kw)
    return e.value.kind


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "/etc/passwd", "a\x00b", "x" * 5000])
def test_parse_refuses_escapes(path: str) -> None:
    with pytest.raises(FileError) as e:
        parse(path)
    assert e.value.kind == "invalid"


def test_parse_drops_dots_and_empty_parts() -> None:
    assert parse("./a//b/.") == ("a", "b")
    assert parse(".") == ()


@pytest.mark.parametrize("path", ["etc/passwd", "passwd", "procroot/etc/passwd", "secret", "sub/up", "etc", "procroot"])
def test_reads_never_follow_a_symlink(tree: Path, path: str) -> None:
    with files.root(str(tree)) as fd:
        assert kind_of_error(files.read, fd, parse(path), 0, 100) == "symlink"


def test_reads_a_regular_file_in_pages(tree: Path) -> None:
    with files.root(str(tree)) as fd:
        first = files.read(fd, parse("sub/a.txt"), 0, 3)
        rest = files.read(fd, parse("sub/a.txt"), 3, 100)
        past = files.read(fd, parse("sub/a.txt"), 100, 10)
    assert (first.data, rest.data, past.data, first.size) == (b"hel", b"lo\n", b"", 6)


@pytest.mark.runsc  # root: makes a device node
def test_a_fifo_socket_or_device_is_an_error_at_once(tree: Path) -> None:
    """O_NONBLOCK + fstat: a FIFO with no writer would block a plain open() forever."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        with files.root(str(tree)) as fd:
            for name in ("fifo", "sock", "null"):
                with pytest.raises(FileError) as e:
                    files.read(fd, parse(name), 0, 10)
                assert e.value.kind == "not_regular" and "not a regular file" in str(e.value), name
            assert kind_of_error(files.read, fd, parse("sub"), 0, 10) == "is_directory"
    finally:
        sock.close()


@needs_root
def test_write_creates_parents_owned_by_the_sandbox_user(tree: Path) -> None:
    with files.root(str(tree)) as fd:
        done = files.write(fd, parse("new/dir/f.bin"), b"\x00\xff", uid=1000, gid=1001)
    assert done.created and done.size == 2 and done.mode == 0o644
    f = tree / "new" / "dir" / "f.bin"
    assert f.read_bytes() == b"\x00\xff"
    for p in (f, f.parent, f.parent.parent):
        assert (p.stat().st_uid, p.stat().st_gid) == (1000, 1001)
    assert [n for n in os.listdir(f.parent) if files.is_temp_name(n)] == []


@needs_root
def test_replacing_keeps_owner_and_mode_unless_a_mode_is_given(tree: Path) -> None:
    f = tree / "sub" / "a.txt"
    os.chown(f, 1234, 1234)
    f.chmod(0o600)
    with files.root(str(tree)) as fd:
        done = files.write(fd, parse("sub/a.txt"), b"new", uid=1000, gid=1000)
        assert not done.created and f.read_bytes() == b"new"
        assert (f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (1234, 0o600)
        files.write(fd, parse("sub/a.txt"), b"x", uid=1000, gid=1000, mode=files.parse_mode("0755"))
    assert stat.S_IMODE(f.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("etc/evil", "symlink"),
        ("passwd", "symlink"),
        ("procroot/tmp/x", "symlink"),
        ("sub/up", "symlink"),
        ("fifo", "not_regular"),
        ("sub", "is_directory"),
        ("sub/a.txt/x", "not_directory"),
    ],
)
def test_writes_refuse_links_and_non_regular_targets(tree: Path, path: str, kind: str) -> None:
    before = sorted(p.name for p in tree.rglob("*"))
    with files.root(str(tree)) as fd:
        assert kind_of_error(files.write, fd, parse(path), b"x", uid=0, gid=0) == kind
    assert sorted(p.name for p in tree.rglob("*")) == before
    assert Path("/etc/passwd").read_text().startswith("root:")
    assert (tree.parent / "secret").read_text() == "outside\n"


@needs_root
def test_a_full_filesystem_leaves_nothing_behind(tmp_path: Path, resolver) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        (small / "keep").write_bytes(b"k" * 1000)
        with files.root(str(small)) as fd:
            with pytest.raises(FileError) as e:
                files.write(fd, parse("deep/new/dir/big"), b"x" * (1024 * 1024), uid=0, gid=0)
            assert e.value.kind == "no_space"
            with pytest.raises(FileError):
                files.write(fd, parse("keep"), b"y" * (1024 * 1024), uid=0, gid=0)
        assert sorted(os.listdir(small)) == ["keep"]  # no temp file, no parent directory made
        assert (small / "keep").read_bytes() == b"k" * 1000  # the old content, whole
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_listing_shows_links_without_following_and_is_bounded(tree: Path) -> None:
    with files.root(str(tree)) as fd:
        entries, truncated = files.listing(fd, (), 3, 1000)
        by_path = {"/".join(e.path): e for e in entries}
        assert by_path["etc"].kind == "symlink" and by_path["etc"].target == "/etc"
        assert by_path["fifo"].kind == "fifo" and by_path["sub/a.txt"].kind == "file"
        assert not any(p.startswith("etc/") or p.startswith("procroot/") for p in by_path)
        assert not truncated
        few, truncated = files.listing(fd, (), 3, 2)
        assert len(few) == 2 and truncated
        assert kind_of_error(files.listing, fd, parse("etc"), 1, 10) == "symlink"


def test_delete_removes_the_link_never_its_target(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    os.symlink(str(outside), tree / "sub" / "link-to-dir")
    with files.root(str(tree)) as fd:
        assert files.delete(fd, parse("secret"), recursive=False) == "symlink"
        assert kind_of_error(files.delete, fd, parse("sub"), recursive=False) == "not_empty"
        assert files.delete(fd, parse("sub"), recursive=True) == "directory"
        assert kind_of_error(files.delete, fd, parse("etc/passwd"), recursive=False) == "symlink"
        assert kind_of_error(files.delete, fd, (), recursive=True) == "invalid"
        assert files.delete(fd, parse("fifo"), recursive=False) == "fifo"
    assert (tmp_path / "secret").read_text() == "outside\n"
    assert (outside / "precious").read_text() == "keep me"
    assert not (tree / "sub").exists()


def test_parse_mode() -> None:
    assert files.parse_mode("644") == 0o644 and files.parse_mode("0755") == 0o755
    for bad in ("4755", "999", "rwx", "7777", ""):
        with pytest.raises(FileError):
            files.parse_mode(bad)
