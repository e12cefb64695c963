"""Image tests on real tools: mmdebstrap, skopeo, umoci, and a real OCI
registry (Debian's docker-registry) on 127.0.0.1.

The mmdebstrap build takes a minute or more, so its result is kept between
test runs on the same machine: `/var/cache/gvisor-mcp-test/build-<recipe
hash>/` (GVISOR_MCP_TEST_CACHE to move it), built by the real
`gvisor-mcp image build` the first time, reused while the recipe and the
host's release stay the same. Only 127.0.0.1 is ever contacted besides the
host's own apt sources.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gvisor_mcp.images.builders import Recipe
from gvisor_mcp.images.sources import host_suite
from gvisor_mcp.images.store import ImageStore, StoredImage

from ..conftest import runsc_usable
from ..images_helpers import Entry, layer_tar, oci_layout
from ..protocol.conftest import run, serve, structured, text  # noqa: F401  (fixtures and helpers)

BIN = Path(sys.executable).with_name("gvisor-mcp")
CACHE = Path(os.environ.get("GVISOR_MCP_TEST_CACHE", "/var/cache/gvisor-mcp-test"))
RECIPE = {"packages": ["jq"], "variant": "apt"}
"""The test image: Essential packages, apt, and jq (a program the host image may lack)."""


def cli(*args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess[str]:
    """`gvisor-mcp ARGS...` as an operator runs it."""
    r = subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
    )
    if check:
        assert r.returncode == 0, f"gvisor-mcp {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
    return r


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/setup.sh installs them)")


def store_state(store: ImageStore) -> dict:
    """Everything a failed operation must leave exactly as it was."""
    names = store.names()
    images = sorted(os.listdir(store.root / "sha256")) if (store.root / "sha256").exists() else []
    tmp = sorted(os.listdir(store.root / "tmp")) if (store.root / "tmp").exists() else []
    return {"names": names, "images": images, "tmp": tmp}


@pytest.fixture(scope="session")
def built() -> tuple[ImageStore, StoredImage]:
    """The test image built with mmdebstrap (cached between runs on this machine)."""
    reason = runsc_usable()
    if reason:
        pytest.skip(reason)
    need_tools("mmdebstrap")
    recipe = Recipe(**RECIPE, suite=host_suite())
    key = recipe.sha256()
    state = CACHE / f"build-{key[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".lock-build-{key[:16]}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run on this machine may be building it
        store = ImageStore(state / "images")
        try:
            image = store.get("built")
            if image.source.get("recipe_sha256") != key:
                raise LookupError
        except LookupError:
            recipe_file = CACHE / f"recipe-{key[:16]}.yaml"
            recipe_file.write_text(json.dumps(recipe.model_dump()))
            started = time.monotonic()
            cli(
                "image",
                "build",
                "built",
                "--recipe",
                str(recipe_file),
                "--state-dir",
                str(state),
                timeout=1800,
                check=True,
            )
            print(f"\nbuilt the test image with mmdebstrap in {time.monotonic() - started:.0f} s", file=sys.stderr)
            image = store.get("built")
    return store, image


def seed(state_dir: Path, cached: ImageStore, image: StoredImage, name: str) -> ImageStore:
    """Give a fresh state directory's store the cached built image under `name`
    (a link to the cached image directory: it is never written, only run)."""
    store = ImageStore(state_dir / "images")
    with store.work():  # creates the layout
        pass
    link = store.image_dir(image.digest)
    if not link.exists():
        os.symlink(cached.image_dir(image.digest), link)
    (store.root / "names" / name).write_text(json.dumps({"digest": image.digest}))
    return store


# --- a tiny image made from the host's dash (a few MB, no mmdebstrap) ---------------


def mini_layers() -> list[bytes]:
    """Two layers: dash and the libraries it needs; then a marker and a whiteout."""
    files = {"usr/bin/dash": "/usr/bin/dash"}
    out = subprocess.run(["ldd", "/usr/bin/dash"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            real = os.path.realpath(path)
            files["usr" + path if not path.startswith("/usr/") else path[1:]] = real
    entries = [Entry("usr/", "dir"), Entry("etc/", "dir"), Entry("etc/removed-later", data=b"x\n")]
    dirs = sorted({str(Path(p).parent) for p in files})
    entries += [Entry(d + "/", "dir") for d in dirs if d != "usr"]
    for rel, src in sorted(files.items()):
        entries.append(Entry(rel, data=Path(src).read_bytes(), mode=0o755))
    entries += [
        Entry("usr/bin/sh", "sym", link="dash"),
        Entry("bin", "sym", link="usr/bin"),
        Entry("lib", "sym", link="usr/lib"),
        Entry("lib64", "sym", link="usr/lib64"),
    ]
    upper = [Entry("etc/marker", data=b"mini image\n"), Entry("etc/.wh.removed-later")]
    return [layer_tar(*entries), layer_tar(*upper)]


@pytest.fixture(scope="session")
def mini_layout(tmp_path_factory) -> Path:
    return oci_layout(tmp_path_factory.mktemp("mini") / "layout", mini_layers(), ref="1")


@pytest.fixture(scope="session")
def mini_archives(mini_layout, tmp_path_factory) -> dict[str, Path]:
    """The mini image as `docker save` output and as an OCI archive, both written by skopeo."""
    need_tools("skopeo")
    d = tmp_path_factory.mktemp("archives")
    out = {"docker-archive": d / "mini-docker.tar", "oci-archive": d / "mini-oci.tar"}
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{mini_layout}:1", f"docker-archive:{out['docker-archive']}:test/mini:1"],
        check=True,
    )
    subprocess.run(
        ["skopeo", "copy", "--quiet", f"oci:{mini_layout}:1", f"oci-archive:{out['oci-archive']}:1"], check=True
    )
    return out


# --- the built image as an OCI image (umoci), and a registry to push it to --------------


@pytest.fixture(scope="session")
def built_oci(built) -> Path:
    """An OCI layout of the built image, made with umoci: tag v1 is the image as
    built, v2 adds a layer that removes a file (a whiteout) and adds one.
    Cached next to the build."""
    need_tools("umoci", "skopeo")
    store, image = built
    layout = CACHE / f"oci-{image.short}"
    with open(CACHE / f".lock-oci-{image.short}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (layout / "index.json").exists() and '"v2"' in (layout / "index.json").read_text():
            return layout
        shutil.rmtree(layout, ignore_errors=True)
        work = CACHE / f".work-oci-{image.short}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            subprocess.run(["umoci", "init", "--layout", str(work / "layout")], check=True)
            subprocess.run(["umoci", "new", "--image", f"{work / 'layout'}:base"], check=True)
            with tarfile.open(work / "v1.tar", "w") as tar:
                for p in sorted(Path(image.rootfs).iterdir()):
                    tar.add(p, arcname=p.name)
            subprocess.run(
                [
                    "umoci",
                    "raw",
                    "add-layer",
                    "--image",
                    f"{work / 'layout'}:base",
                    "--tag",
                    "v1",
                    str(work / "v1.tar"),
                ],
                check=True,
            )
            (work / "v2.tar").write_bytes(
                layer_tar(
                    Entry("etc/pulled-marker", data=b"second layer\n"),
                    Entry("usr/share/doc/jq/.wh.copyright"),
                )
            )
            subprocess.run(
                ["umoci", "raw", "add-layer", "--image", f"{work / 'layout'}:v1", "--tag", "v2", str(work / "v2.tar")],
                check=True,
            )
            os.rename(work / "layout", layout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return layout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Iterator[str]:
    """Debian's docker-registry serving plain HTTP on 127.0.0.1 (started and stopped here)."""
    need_tools("docker-registry", "skopeo")
    d = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = d / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {d / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    with open(d / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not start: {(d / 'registry.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(layout: Path, tag: str, registry: str, repo: str) -> str:
    ref = f"{registry}/{repo}:{tag}"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"], check=True
    )
    return ref


def write_policy(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs as the state directory: a full disk, for real."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)
