"""`gvisor-mcp image import | list | inspect | rm | prune` with real skopeo,
and every bad input leaving the store exactly as it was."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvisor_mcp.images.store import ImageStore

from ..images_helpers import Entry, layer_tar, oci_layout, tar_directory
from .conftest import cli, mini_layers, need_tools, store_state


@pytest.fixture
def state(tmp_path) -> Path:
    need_tools("skopeo")
    return tmp_path / "state"


def imported(state: Path, source: Path, name: str, *extra: str) -> dict:
    r = cli("image", "import", str(source), "--name", name, "--state-dir", str(state), *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", ["docker-archive", "oci-archive", "oci"])
def test_import_each_kind_of_archive(state, mini_archives, mini_layout, kind):
    source = mini_layout if kind == "oci" else mini_archives[kind]
    image = imported(state, source, "mini")
    assert image["names"] == ["mini"]
    assert image["source"]["kind"] == "import" and image["source"]["format"] == kind
    assert image["source"]["manifest_digest"].startswith("sha256:")
    assert image["has_shell"] is True
    rootfs = Path(image["rootfs"])
    assert (rootfs / "etc" / "marker").read_text() == "mini image\n"
    assert not (rootfs / "etc" / "removed-later").exists()  # the second layer's whiteout
    for d in ("proc", "dev", "sys", "tmp", "workspace", "var/tmp"):
        assert (rootfs / d).is_dir()
    assert "sandbox:x:1000:1000" in (rootfs / "etc" / "passwd").read_text()


def test_the_same_content_gets_the_same_digest_whatever_way_it_came_in(state, mini_archives, mini_layout):
    a = imported(state, mini_archives["docker-archive"], "a")
    b = imported(state, mini_archives["oci-archive"], "b")
    c = imported(state, mini_layout, "c")
    assert a["digest"] == b["digest"] == c["digest"]
    assert sorted(c["names"]) == ["a", "b", "c"]
    assert len(os.listdir(state / "images" / "sha256")) == 1


def test_list_inspect_rm_and_prune(state, mini_archives, tmp_path):
    mini = imported(state, mini_archives["docker-archive"], "mini")
    other_layout = oci_layout(tmp_path / "other", [*mini_layers()[:1], layer_tar(Entry("etc/other", data=b"o"))])
    other = imported(state, other_layout, "other")
    assert other["digest"] != mini["digest"]
    r = cli("image", "list", "--state-dir", str(state))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "DIGEST", "SIZE"]
    assert any(line.startswith("mini ") and mini["digest"][7:19] in line for line in lines)
    listed = json.loads(cli("image", "list", "--json", "--state-dir", str(state)).stdout)
    assert {tuple(i["names"]) for i in listed} == {("mini",), ("other",)}
    by_digest = json.loads(cli("image", "inspect", mini["digest"], "--state-dir", str(state)).stdout)
    assert by_digest == mini
    # Re-point `other` at mini's image: its old image stays, unnamed, until pruned.
    again = imported(state, mini_archives["oci-archive"], "other")
    assert again["digest"] == mini["digest"]
    listed = json.loads(cli("image", "list", "--json", "--state-dir", str(state)).stdout)
    assert [i["names"] for i in listed] == [["mini", "other"], []]
    r = cli("image", "rm", "other", "--state-dir", str(state))
    assert r.returncode == 0 and "keeps its other names" in r.stdout
    r = cli("image", "prune", "--state-dir", str(state))
    assert r.returncode == 0 and other["digest"] in r.stdout
    r = cli("image", "rm", "mini", "--state-dir", str(state))
    assert r.returncode == 0 and "freed" in r.stdout
    assert os.listdir(state / "images" / "sha256") == [] and os.listdir(state / "images" / "tmp") == []
    r = cli("image", "inspect", "mini", "--state-dir", str(state))
    assert r.returncode == 1 and "is not in the image store" in r.stderr and "image build mini" in r.stderr


def test_rm_of_an_image_in_use_is_refused_naming_the_user(state, mini_archives):
    image = imported(state, mini_archives["docker-archive"], "mini")
    store = ImageStore(state / "images")
    with store.hold(image["digest"], "run res_1234 (tenant alice) of server pid 42"):
        before = store_state(store)
        r = cli("image", "rm", "mini", "--state-dir", str(state))
        assert r.returncode == 1
        assert "in use" in r.stderr and "run res_1234 (tenant alice) of server pid 42" in r.stderr
        assert store_state(store) == before
        r = cli("image", "prune", "--state-dir", str(state))
        assert store_state(store) == before
    assert cli("image", "rm", "mini", "--state-dir", str(state)).returncode == 0


def test_a_lease_of_a_dead_process_does_not_block_rm(state, mini_archives):
    image = imported(state, mini_archives["docker-archive"], "mini")
    code = (
        "import os; from gvisor_mcp.images.store import ImageStore; "
        f"ImageStore({str(state / 'images')!r}).hold({image['digest']!r}, 'a server that died'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    leases = list((state / "images" / "leases").rglob("*-*"))
    assert leases, "the dead process left its lease file"
    assert cli("image", "rm", "mini", "--state-dir", str(state)).returncode == 0


# --- bad input: a clear error, the store unchanged ----------------------------------------


@pytest.fixture
def store_with_one(state, mini_archives) -> ImageStore:
    imported(state, mini_archives["docker-archive"], "mini")
    return ImageStore(state / "images")


def refused(state: Path, store: ImageStore, *args: str) -> str:
    before = store_state(store)
    r = cli(*args, "--state-dir", str(state))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert store_state(store) == before
    return r.stderr


HOSTILE = {
    "absolute path": ([layer_tar(Entry("/etc/evil", data=b"x"))], "absolute path"),
    "dotdot": ([layer_tar(Entry("../../../evil", data=b"x"))], "'..' components"),
    "symlink then write through it": (
        [layer_tar(Entry("d", "sym", link="/tmp"), Entry("d/gvisor-mcp-evil", data=b"x"))],
        "'d' is a symlink",
    ),
    "symlink in a lower layer": (
        [layer_tar(Entry("etc", "sym", link="/etc")), layer_tar(Entry("etc/gvisor-mcp-evil", data=b"x"))],
        "'etc' is a symlink",
    ),
    "hardlink outside": ([layer_tar(Entry("h", "hard", link="/etc/shadow"))], "hardlink target"),
    "hardlink dotdot": ([layer_tar(Entry("h", "hard", link="../../../etc/shadow"))], "hardlink target"),
    "whiteout dotdot": ([layer_tar(Entry("a/", "dir")), layer_tar(Entry("a/.wh..."))], "whiteout must name"),
    "whiteout through symlink": (
        [layer_tar(Entry("l", "sym", link="/etc")), layer_tar(Entry("l/.wh.passwd"))],
        "'l' is a symlink",
    ),
    "opaque through symlink": (
        [layer_tar(Entry("l", "sym", link="/etc")), layer_tar(Entry("l/.wh..wh..opq"))],
        "'l' is a symlink",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_by_import_naming_the_entry(state, store_with_one, tmp_path, case):
    layers, problem = HOSTILE[case]
    layout = oci_layout(tmp_path / "hostile", layers)
    err = refused(state, store_with_one, "image", "import", str(layout), "--name", "evil")
    assert problem in err and "entry " in err, err
    assert not Path("/tmp/gvisor-mcp-evil").exists() and not Path("/etc/gvisor-mcp-evil").exists()
    assert "evil" not in store_with_one.names()


def test_devices_and_setuid_in_an_import_are_dropped_and_noted(state, tmp_path):
    layout = oci_layout(
        tmp_path / "l",
        [
            *mini_layers(),
            layer_tar(
                Entry("dev/kmsg", "chr", devmajor=1, devminor=11),
                Entry("usr/bin/su", data=b"x", mode=0o4755),
                Entry("usr/bin/ping", data=b"x", mode=0o755, pax={"SCHILY.xattr.security.capability": "\x01"}),
            ),
        ],
    )
    image = imported(state, layout, "odd")
    rootfs = Path(image["rootfs"])
    assert not (rootfs / "dev" / "kmsg").exists()
    assert (rootfs / "usr/bin/su").stat().st_mode & 0o7777 == 0o755
    assert os.listxattr(rootfs / "usr/bin/ping") == []
    notes = "\n".join(image["notes"])
    assert "device node dev/kmsg" in notes and "setuid/setgid from usr/bin/su" in notes
    assert "capabilities of usr/bin/ping" in notes


def test_an_archive_above_the_size_limit_is_refused(state, store_with_one, tmp_path):
    big = oci_layout(tmp_path / "big", [layer_tar(Entry("blob", data=os.urandom(3 * 1024 * 1024)))], compress=False)
    err = refused(state, store_with_one, "image", "import", str(big), "--name", "big", "--max-size", "2MiB")
    assert "above the limit of 2 MiB" in err
    archive = tar_directory(big, tmp_path / "big.tar")
    err = refused(state, store_with_one, "image", "import", str(archive), "--name", "big", "--max-size", "2MiB")
    assert "above the limit of 2 MiB" in err


def test_a_decompression_bomb_stops_at_the_unpacked_limit(state, store_with_one, tmp_path):
    zeros = layer_tar(Entry("zeros", data=bytes(8 * 1024 * 1024)))
    layout = oci_layout(tmp_path / "bomb", [zeros])  # ~8 KiB of gzip
    assert sum(f.stat().st_size for f in (layout / "blobs").rglob("*")) < 1024 * 1024
    err = refused(state, store_with_one, "image", "import", str(layout), "--name", "bomb", "--max-size", "4MiB")
    assert "entry 'zeros'" in err and "larger than the limit of 4 MiB unpacked" in err


@pytest.mark.parametrize("what", ["garbage", "gzip", "truncated", "corrupt layer", "arm64", "zstd", "index"])
def test_corrupt_or_unsupported_archives_are_refused(state, store_with_one, tmp_path, mini_archives, what):
    path = tmp_path / "input.tar"
    expect = {
        "garbage": "not a complete, uncompressed tar archive",
        "gzip": "not a complete, uncompressed tar archive",
        "truncated": "not a complete, uncompressed tar archive",
        "corrupt layer": "not a valid tar archive",
        "arm64": "this host runs 'amd64'",
        "zstd": "zstd",
        "index": "amd64",
    }[what]
    if what == "garbage":
        path.write_bytes(b"definitely not an image\n" * 100)
    elif what == "gzip":
        path.write_bytes(gzip.compress(mini_archives["docker-archive"].read_bytes()))
    elif what == "truncated":
        data = mini_archives["docker-archive"].read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    else:
        layout = tmp_path / "layout"
        if what == "corrupt layer":
            oci_layout(layout, [b"\x00" * 100 + b"not a tar" * 1000], compress=True)
        elif what == "arm64":
            oci_layout(layout, mini_layers(), architecture="arm64")
        else:  # zstd layers; or an index whose only image is for another platform
            oci_layout(layout, mini_layers(), architecture="arm64" if what == "index" else "amd64")
            index = json.loads((layout / "index.json").read_text())
            manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
            if what == "zstd":
                manifest = json.loads(manifest_path.read_text())
                for layer in manifest["layers"]:
                    layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"
                data = json.dumps(manifest).encode()
            else:
                only = {**index["manifests"][0], "platform": {"os": "linux", "architecture": "arm64"}}
                data = json.dumps(
                    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [only]}
                ).encode()
            import hashlib

            digest = hashlib.sha256(data).hexdigest()
            (layout / "blobs" / "sha256" / digest).write_bytes(data)
            media = (
                "application/vnd.oci.image.manifest.v1+json"
                if what == "zstd"
                else "application/vnd.oci.image.index.v1+json"
            )
            index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data), mediaType=media)
            (layout / "index.json").write_text(json.dumps(index))
        path = layout
    err = refused(state, store_with_one, "image", "import", str(path), "--name", "bad")
    assert expect in err, err
    assert "bad" not in store_with_one.names()


def test_import_of_a_missing_file_or_with_a_bad_name(state, store_with_one, mini_archives):
    err = refused(state, store_with_one, "image", "import", "/nonexistent/image.tar", "--name", "x")
    assert "no such file or directory" in err
    for bad in ("host", "../x", "a b", "-x", "x" * 65):
        err = refused(state, store_with_one, "image", "import", str(mini_archives["docker-archive"]), f"--name={bad}")
        assert "image name" in err and "not allowed" in err


def test_rm_and_inspect_of_unknown_names(state, store_with_one):
    err = refused(state, store_with_one, "image", "rm", "nope")
    assert "'nope' is not in the image store" in err
    err = refused(state, store_with_one, "image", "rm", "sha256:" + "0" * 64)
    assert "is not in the image store" in err
    err = refused(state, store_with_one, "image", "inspect", "sha256:xyz")
    assert "64 lowercase hex digits" in err or "not allowed" in err


def test_an_unreachable_registry_is_a_clear_error(state, store_with_one):
    err = refused(state, store_with_one, "image", "pull", "127.0.0.1:9/nothing/here:1", "--insecure", "--name", "x")
    assert "looking up 127.0.0.1:9/nothing/here:1 failed" in err and "connection refused" in err.lower()


def test_a_full_disk_during_an_import_leaves_the_store_unchanged(small_disk, mini_archives, tmp_path):
    need_tools("skopeo")
    state = small_disk / "state"
    imported(state, mini_archives["docker-archive"], "mini")
    store = ImageStore(state / "images")
    # 24 MiB of random data: the archive fits the limit, not the disk.
    big = oci_layout(tmp_path / "big", [layer_tar(Entry("blob", data=os.urandom(24 * 1024 * 1024)))])
    err = refused(state, store, "image", "import", str(big), "--name", "big")
    assert "disk holding the image store is full" in err or "the disk is full" in err, err
    assert store.names() == {"mini": store.get("mini").digest}


def test_import_without_a_name_uses_the_files(state, mini_archives, mini_layout):
    r = cli("image", "import", str(mini_archives["docker-archive"]), "--state-dir", str(state))
    assert r.returncode == 0 and json.loads(r.stdout)["names"] == ["mini-docker"], r.stderr
    r = cli("image", "import", str(mini_layout) + "/", "--state-dir", str(state))
    assert r.returncode == 0 and sorted(json.loads(r.stdout)["names"]) == ["layout", "mini-docker"], r.stderr
