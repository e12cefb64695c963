"""The layer unpacker against hostile archives: nothing lands outside the
image directory, every refusal names the entry, and what is dropped is dropped."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from gvisor_mcp.images.unpack import Unpacker, UnpackError, UnpackLimits, clean_name

from ..images_helpers import Entry, layer_tar

pytestmark = pytest.mark.runsc  # root: the unpacker gives every file its owner from the layer


def unpack(root: Path, *layers: bytes, limits: UnpackLimits | None = None) -> Unpacker:
    root.mkdir(exist_ok=True)
    with Unpacker(root, limits) as u:
        for i, data in enumerate(layers):
            u.apply(io.BytesIO(data), f"layer {i}")
    return u


def listing(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes().decode(errors="replace")
    return out


@pytest.fixture
def outside(tmp_path):
    """A directory next to the image that no entry may reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_text("host file\n")
    return d


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "host file\n"


def test_a_normal_layer(tmp_path):
    root = tmp_path / "img"
    unpack(
        root,
        layer_tar(
            Entry("etc/", "dir"),
            Entry("etc/hostname", data=b"x\n"),
            Entry("bin/sh", data=b"#!", mode=0o755),
            Entry("usr/bin/sh", "hard", link="bin/sh"),
            Entry("lib", "sym", link="usr/lib"),
            Entry("abs", "sym", link="/etc/hostname"),
        ),
    )
    assert listing(root) == {
        "etc": "dir",
        "etc/hostname": "x\n",
        "bin": "dir",
        "bin/sh": "#!",
        "usr": "dir",
        "usr/bin": "dir",
        "usr/bin/sh": "#!",
        "lib": "-> usr/lib",
        "abs": "-> /etc/hostname",
    }
    assert (root / "bin/sh").stat().st_ino == (root / "usr/bin/sh").stat().st_ino
    assert stat.S_IMODE((root / "bin/sh").stat().st_mode) == 0o755


@pytest.mark.parametrize("name", ["/etc/passwd", "/abs"])
def test_absolute_names_are_refused(tmp_path, name):
    with pytest.raises(UnpackError, match="absolute path") as e:
        unpack(tmp_path / "img", layer_tar(Entry(name, data=b"x")))
    assert e.value.entry == name


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "a/b/../../../x", ".."])
def test_dotdot_names_are_refused(tmp_path, outside, name):
    with pytest.raises(UnpackError, match=r"'\.\.' components") as e:
        unpack(tmp_path / "img", layer_tar(Entry("a/", "dir"), Entry(name, data=b"x")))
    assert e.value.entry == name and "layer 0" in str(e.value)
    assert_untouched(outside)


def test_writing_through_a_symlink_to_outside_is_refused(tmp_path, outside):
    layer = layer_tar(
        Entry("link", "sym", link=str(outside)),
        Entry("link/victim", data=b"pwned"),
    )
    with pytest.raises(UnpackError, match="'link' is a symlink") as e:
        unpack(tmp_path / "img", layer)
    assert e.value.entry == "link/victim"
    assert_untouched(outside)


def test_a_relative_symlink_escaping_and_a_deeper_write_are_refused(tmp_path, outside):
    layer = layer_tar(Entry("a/", "dir"), Entry("a/up", "sym", link="../../outside"), Entry("a/up/new", data=b"x"))
    with pytest.raises(UnpackError, match="'a/up' is a symlink"):
        unpack(tmp_path / "img", layer)
    assert_untouched(outside)


def test_a_symlink_from_a_lower_layer_is_not_followed_either(tmp_path, outside):
    lower = layer_tar(Entry("etc", "sym", link=str(outside)))
    upper = layer_tar(Entry("etc/victim", data=b"pwned"))
    with pytest.raises(UnpackError, match="layer 1") as e:
        unpack(tmp_path / "img", lower, upper)
    assert e.value.entry == "etc/victim"
    assert_untouched(outside)


def test_a_file_replacing_a_symlink_replaces_the_link_not_its_target(tmp_path, outside):
    lower = layer_tar(Entry("victim", "sym", link=str(outside / "victim")))
    upper = layer_tar(Entry("victim", data=b"image content"))
    root = tmp_path / "img"
    unpack(root, lower, upper)
    assert listing(root) == {"victim": "image content"}
    assert_untouched(outside)


@pytest.mark.parametrize("link", [None, "../outside/victim", "/etc/passwd"])
def test_hardlinks_to_outside_are_refused(tmp_path, outside, link):
    link = link or str(outside / "victim")
    with pytest.raises(UnpackError, match="hardlink target") as e:
        unpack(tmp_path / "img", layer_tar(Entry("h", "hard", link=link)))
    assert e.value.entry == "h"
    assert_untouched(outside)


def test_a_hardlink_through_a_symlink_is_refused(tmp_path, outside):
    layer = layer_tar(Entry("out", "sym", link=str(outside)), Entry("h", "hard", link="out/victim"))
    with pytest.raises(UnpackError, match="'out' is a symlink"):
        unpack(tmp_path / "img", layer)
    assert_untouched(outside)


def test_a_hardlink_to_a_symlink_or_a_missing_file_is_refused(tmp_path):
    with pytest.raises(UnpackError, match="not a regular file"):
        unpack(tmp_path / "a", layer_tar(Entry("s", "sym", link="/etc/shadow"), Entry("h", "hard", link="s")))
    with pytest.raises(UnpackError, match="not a regular file|does not exist"):
        unpack(tmp_path / "b", layer_tar(Entry("h", "hard", link="nowhere")))


def test_devices_fifos_setuid_setgid_and_capabilities_are_dropped(tmp_path):
    root = tmp_path / "img"
    u = unpack(
        root,
        layer_tar(
            Entry("dev/null", "chr", devmajor=1, devminor=3),
            Entry("dev/sda", "blk", devmajor=8, devminor=0),
            Entry("fifo", "fifo"),
            Entry("suid", data=b"x", mode=0o4755),
            Entry("sgid", data=b"x", mode=0o2755),
            Entry("sticky/", "dir", mode=0o1777),
            Entry("cap", data=b"x", mode=0o755, pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}),
            Entry("xattr", data=b"x", pax={"SCHILY.xattr.user.evil": "1"}),
        ),
    )
    assert sorted(os.listdir(root)) == ["cap", "sgid", "sticky", "suid", "xattr"]
    assert stat.S_IMODE((root / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "sgid").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "sticky").stat().st_mode) == 0o1777
    for name in ("cap", "xattr"):
        assert os.listxattr(root / name) == []
    notes = "\n".join(u.stats.notes)
    for word in (
        "device node dev/null",
        "device node dev/sda",
        "FIFO fifo",
        "setuid/setgid from suid",
        "capabilities of cap",
    ):
        assert word in notes


def test_whiteouts_remove_lower_entries_only_inside_the_image(tmp_path, outside):
    root = tmp_path / "img"
    lower = layer_tar(
        Entry("a/", "dir"),
        Entry("a/f", data=b"1"),
        Entry("a/g", data=b"2"),
        Entry("d/", "dir"),
        Entry("d/x", data=b"x"),
        Entry("keep", data=b"k"),
    )
    upper = layer_tar(
        Entry("a/.wh.f", data=b""),
        Entry("d/new", data=b"n"),
        Entry("d/.wh..wh..opq", data=b""),
        Entry(".wh.nothing-there", data=b""),
    )
    unpack(root, lower, upper)
    assert listing(root) == {"a": "dir", "a/g": "2", "d": "dir", "d/new": "n", "keep": "k"}


@pytest.mark.parametrize("name", ["a/.wh..", "a/.wh.", ".wh.."])
def test_whiteouts_naming_dot_or_dotdot_are_refused(tmp_path, outside, name):
    with pytest.raises(UnpackError, match="whiteout must name a file") as e:
        unpack(tmp_path / "img", layer_tar(Entry("a/", "dir")), layer_tar(Entry(name, data=b"")))
    assert e.value.entry == name
    assert_untouched(outside)


def test_a_whiteout_through_a_symlink_is_refused(tmp_path, outside):
    lower = layer_tar(Entry("out", "sym", link=str(outside)))
    upper = layer_tar(Entry("out/.wh.victim", data=b""))
    with pytest.raises(UnpackError, match="'out' is a symlink"):
        unpack(tmp_path / "img", lower, upper)
    assert_untouched(outside)


def test_an_opaque_marker_through_a_symlink_is_refused(tmp_path, outside):
    lower = layer_tar(Entry("out", "sym", link=str(outside)))
    upper = layer_tar(Entry("out/.wh..wh..opq", data=b""))
    with pytest.raises(UnpackError, match="'out' is a symlink"):
        unpack(tmp_path / "img", lower, upper)
    assert_untouched(outside)


def test_a_whiteout_of_an_entry_of_the_same_layer_is_refused(tmp_path):
    with pytest.raises(UnpackError, match="same layer created"):
        unpack(tmp_path / "img", layer_tar(Entry("f", data=b"1"), Entry(".wh.f", data=b"")))


def test_whiteout_files_never_appear_in_the_image(tmp_path):
    root = tmp_path / "img"
    unpack(root, layer_tar(Entry(".wh..wh.plnk/", "dir"), Entry("x/.wh..wh..opq", data=b""), Entry("x/y", data=b"y")))
    assert listing(root) == {"x": "dir", "x/y": "y"}


def test_the_size_limit_names_the_entry_that_crossed_it(tmp_path):
    layer = layer_tar(Entry("a", data=b"x" * 600), Entry("b", data=b"x" * 600))
    with pytest.raises(UnpackError, match="larger than the limit of 1 KiB") as e:
        unpack(tmp_path / "img", layer, limits=UnpackLimits(max_bytes=1024))
    assert e.value.entry == "b"


@pytest.mark.slow
def test_a_gzip_bomb_stops_at_the_limit(tmp_path):
    """100 MiB of zeros in ~100 KiB of gzip: refused when the header says so, before writing."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 100 * 1024 * 1024

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    data = gzip.compress(buf.getvalue(), compresslevel=9)
    assert len(data) < 1024 * 1024
    with pytest.raises(UnpackError, match="larger than the limit"):
        unpack(tmp_path / "img", data, limits=UnpackLimits(max_bytes=10 * 1024 * 1024))
    assert not (tmp_path / "img" / "zeros").exists()


def test_the_entry_limit(tmp_path):
    layer = layer_tar(*[Entry(f"f{i}", data=b"") for i in range(20)])
    with pytest.raises(UnpackError, match="more than 10 entries"):
        unpack(tmp_path / "img", layer, limits=UnpackLimits(max_entries=10))


@pytest.mark.parametrize(
    "data,problem",
    [
        (b"this is not a tar archive at all" * 100, "not a valid tar archive"),
        (b"\x28\xb5\x2f\xfd" + b"\x00" * 600, "not a valid tar archive|unsupported compression"),
        (b"", "not a valid tar archive"),
    ],
)
def test_corrupt_layers_are_refused(tmp_path, data, problem):
    with pytest.raises(UnpackError, match=problem):
        unpack(tmp_path / "img", data)


def test_a_truncated_layer_is_refused(tmp_path):
    data = layer_tar(Entry("big", data=b"x" * 100_000))
    with pytest.raises(UnpackError, match="not a valid tar archive"):
        unpack(tmp_path / "img", data[: len(data) // 2])


@pytest.mark.parametrize("name", ["ok\x00evil", "x" * 5000, "a/" + "y" * 300])
def test_odd_names(name):
    with pytest.raises(UnpackError):
        clean_name(name)


def test_replacing_directories_and_files_across_layers(tmp_path):
    root = tmp_path / "img"
    lower = layer_tar(Entry("d/", "dir"), Entry("d/f", data=b"1"), Entry("f", data=b"2"))
    upper = layer_tar(Entry("d", data=b"now a file"), Entry("f/", "dir"), Entry("f/g", data=b"3"))
    unpack(root, lower, upper)
    assert listing(root) == {"d": "now a file", "f": "dir", "f/g": "3"}
