"""`image build` with real mmdebstrap (cached, see conftest) and `image pull`
from a real registry on 127.0.0.1 holding an image this test built and pushed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gvisor_mcp.images.builders import Recipe, default_name, load_recipe
from gvisor_mcp.images.errors import ImageError
from gvisor_mcp.images.sources import host_stanzas, sources_for
from gvisor_mcp.images.store import ImageStore

from .conftest import cli, need_tools, push, store_state


def test_the_built_image(built):
    store, image = built
    assert image.names == ("built",)
    assert image.source["kind"] == "build" and image.source["packages"] == ["jq"]
    assert image.source["variant"] == "apt" and image.source["tool"].startswith("mmdebstrap")
    # Built from the host's own apt sources, nothing else.
    _, uris = sources_for(image.source["suite"])
    assert image.source["apt_sources"] == uris
    packages = dict(p.split("=", 1) for p in image.packages or [])
    assert {"jq", "apt", "dash", "coreutils"} <= set(packages)
    rootfs = Path(image.rootfs)
    assert (rootfs / "usr/bin/jq").is_file() and image.has_shell
    assert (rootfs / "workspace").is_dir() and "sandbox:x:1000" in (rootfs / "etc/passwd").read_text()
    # mmdebstrap's device nodes and setuid bits did not come along.
    import stat

    kinds = {p.name: p.lstat().st_mode for p in (rootfs / "dev").iterdir()}
    assert "null" not in kinds and not any(stat.S_ISCHR(m) or stat.S_ISBLK(m) for m in kinds.values())
    assert (rootfs / "usr/bin/su").stat().st_mode & 0o6000 == 0
    assert any("device node" in n for n in image.notes) and any("setuid" in n for n in image.notes)


def test_recipes_and_their_errors(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text("packages: [python3, jq]\nvariant: minbase\n")
    r = load_recipe(f)
    assert r.packages == ("python3", "jq") and r.variant == "minbase" and r.suite is None
    assert r.sha256() == Recipe(packages=("python3", "jq"), variant="minbase").sha256() != Recipe().sha256()
    for text, problem in [
        ("packages: [Python3]", "not a Debian package name"),
        ("packages: ['jq; rm -rf /']", "not a Debian package name"),
        ("packages: [jq]\nvariant: fat", "not a variant"),
        ("packages: [jq]\nsuite: '../x'", "not a suite name"),
        ("packages: [jq]\nmirror: http://x", "unknown key"),
        ("- jq", "expected a mapping"),
        ("packages: [", "not valid YAML"),
    ]:
        f.write_text(text)
        with pytest.raises(ImageError, match=problem):
            load_recipe(f)


def test_build_refuses_bad_input_before_running_anything(tmp_path):
    need_tools("mmdebstrap")
    state = tmp_path / "state"
    for args, problem in [
        (["build", "host", "--packages", "jq"], "image name 'host' is not allowed"),
        (["build", "x", "--packages", "jq;reboot"], "not a Debian package name"),
        (["build", "x", "--suite", "no-such-suite"], "no apt source for suite 'no-such-suite'"),
        (["build", "x", "--recipe", str(tmp_path / "missing.yaml")], "cannot read recipe"),
        (["build", "x", "--max-size", "12MB"], "--max-size"),
    ]:
        r = cli("image", *args, "--state-dir", str(state))
        assert r.returncode == 1 and problem in r.stderr, (args, r.stderr)
    assert not (state / "images" / "names").exists() or os.listdir(state / "images" / "names") == []


def test_a_failed_build_says_why_and_leaves_the_store_as_it_was(tmp_path, built):
    """An unknown package: mmdebstrap fails after reading the host's apt indexes."""
    state = tmp_path / "state"
    store = ImageStore(state / "images")
    with store.work():
        pass
    before = store_state(store)
    r = cli(
        "image", "build", "broken", "--packages", "gvisor-mcp-no-such-package", "--state-dir", str(state), timeout=900
    )
    assert r.returncode == 1
    assert "mmdebstrap failed" in r.stderr and "gvisor-mcp-no-such-package" in r.stderr, r.stderr
    assert "nothing was added to the store" in r.stderr
    assert store_state(store) == before


def test_a_full_disk_during_a_build_is_a_clear_error_and_changes_nothing(small_disk, built):
    """The store on a 16 MiB tmpfs: mmdebstrap runs out of room (apt's indexes alone are larger)."""
    state = small_disk / "state"
    store = ImageStore(state / "images")
    with store.work():
        pass
    before = store_state(store)
    r = cli("image", "build", "full", "--packages", "jq", "--state-dir", str(state), timeout=900)
    assert r.returncode == 1
    assert "disk holding the image store is full" in r.stderr or "the disk is full" in r.stderr, r.stderr
    assert store_state(store) == before


def test_a_terminated_build_stops_mmdebstrap_and_changes_nothing(tmp_path, built):
    """SIGTERM to `image build` (systemd stop, a CI timeout) must not leave mmdebstrap and apt
    running in their own session, nor a work directory in the store."""
    import signal
    import subprocess
    import time

    from .conftest import BIN

    state = tmp_path / "state"
    store = ImageStore(state / "images")
    with store.work():
        pass
    before = store_state(store)
    proc = subprocess.Popen(
        [str(BIN), "image", "build", "stopped", "--packages", "jq", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def ours() -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"mmdebstrap" in cmd and str(state).encode() in cmd:
                pids.append(int(pid))
        return pids

    deadline = time.monotonic() + 120
    while not ours() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ours(), "mmdebstrap never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "nothing was added" in err
    assert ours() == []
    assert store_state(store) == before


def test_the_host_sources_parser(tmp_path):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://mirror.invalid/debian bookworm main contrib\n"
        "deb-src http://mirror.invalid/debian bookworm main\n"
    )
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other.invalid/x\nSuites: nodistro\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.invalid/\nSuites: bookworm\nComponents: main\n"
    )
    assert len(host_stanzas(apt)) == 3  # the disabled one is left out
    text, uris = sources_for("bookworm", apt)
    assert uris == ["http://mirror.invalid/debian", "http://sec.invalid/debian-security"]
    assert "Signed-By: /k.gpg" in text and "Architectures: amd64" in text and "contrib" in text
    assert "nodistro" not in text and "off.invalid" not in text
    with pytest.raises(ImageError, match="no apt source for suite 'trixie'"):
        sources_for("trixie", apt)


def test_default_names():
    assert default_name("127.0.0.1:5000/team/tool:1.2") == "tool"
    assert default_name("docker://registry.example/a/b@sha256:" + "0" * 64) == "b"
    assert default_name("/tmp/x/mini-docker") == "mini-docker"


def test_pull_from_a_local_registry(tmp_path, built_oci, registry, built):
    """Push the built image (plus a layer with a whiteout, both made by umoci)
    to a registry on 127.0.0.1 with skopeo, then pull it."""
    need_tools("skopeo")
    _, built_image = built
    ref = push(built_oci, "v2", registry, "test/small")
    state = tmp_path / "state"
    r = cli("image", "pull", ref, "--insecure", "--state-dir", str(state), timeout=900)
    assert r.returncode == 0, r.stderr
    image = json.loads(r.stdout)
    assert image["names"] == ["small"]
    assert image["source"] == {"kind": "pull", "ref": ref, "manifest_digest": image["source"]["manifest_digest"]}
    rootfs = Path(image["rootfs"])
    assert (rootfs / "etc/pulled-marker").read_text() == "second layer\n"
    assert not (rootfs / "usr/share/doc/jq/copyright").exists()  # the whiteout
    assert (rootfs / "usr/bin/jq").is_file()
    assert image["digest"] != built_image.digest  # different content, different digest
    assert image["packages"] == built_image.packages
    # Pulling again changes nothing: same content, same digest, one image.
    again = json.loads(
        cli("image", "pull", ref, "--insecure", "--name", "again", "--state-dir", str(state), timeout=900).stdout
    )
    assert again["digest"] == image["digest"] and sorted(again["names"]) == ["again", "small"]
    assert len(os.listdir(state / "images" / "sha256")) == 1


def test_pull_refusals_leave_the_store_unchanged(tmp_path, built_oci, registry):
    need_tools("skopeo")
    ref = push(built_oci, "v1", registry, "test/refused")
    state = tmp_path / "state"
    store = ImageStore(state / "images")
    with store.work():
        pass
    before = store_state(store)
    for args, problem in [
        ([ref, "--insecure", "--max-size", "1MiB"], "above the limit of 1 MiB; nothing was downloaded"),
        ([f"{registry}/test/none:v1", "--insecure"], "looking up"),
        ([ref], "http"),  # TLS required unless --insecure
        (["not a ref"], "not an image reference"),
    ]:
        r = cli("image", "pull", *args, "--state-dir", str(state), timeout=300)
        assert r.returncode == 1 and problem in r.stderr, (args, r.stderr)
        assert store_state(store) == before


def test_the_agent_recipe_matches_the_readme():
    repo = Path(__file__).resolve().parents[2]
    recipe = load_recipe(repo / "policies" / "recipes" / "agent.yaml")
    wanted = "python3,python3-pip,python3-venv,nodejs,npm,git,curl,build-essential,jq,ca-certificates"
    assert recipe.packages == tuple(wanted.split(",")) and recipe.variant == "apt"
    assert f"--packages {wanted}" in (repo / "README.md").read_text().replace("\\\n    ", "")
