"""Commands in store images through the real MCP server: each image (built
with mmdebstrap, pulled from a registry, imported from a tarball) runs,
and the receipt names the digest it ran; read-only by default, writable
through an overlay counted against the run's memory; the same /workspace,
/tmp, user and limits as `host`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gvisor_mcp.images.store import ImageStore

from ..adversarial.conftest import ok
from .conftest import cli, push, run, seed, structured, text

pytestmark = pytest.mark.runsc

POLICY = """\
version: 1
defaults: {{user: "{user}", memory: 256MiB}}
workspace: {{scope: {scope}, size: 32MiB}}
images:
  catalog:
    built: {{store: built}}
    rw: {{store: built, writable: true}}
    pulled: {{store: small}}
    mini: {{store: mini}}
    pinned: {{store: "built@{digest}"}}
  allowed: [host, built, rw, pulled, mini, pinned]
"""


@pytest.fixture(scope="module")
def images_state(tmp_path_factory, built, mini_archives, built_oci, registry) -> tuple[Path, dict[str, str]]:
    """A state directory whose store holds the three kinds of image."""
    state = tmp_path_factory.mktemp("images-state") / "state"
    cached, image = built
    seed(state, cached, image, "built")
    cli(
        "image", "import", str(mini_archives["docker-archive"]), "--name", "mini", "--state-dir", str(state), check=True
    )
    ref = push(built_oci, "v2", registry, "test/small")
    cli("image", "pull", ref, "--insecure", "--state-dir", str(state), timeout=900, check=True)
    store = ImageStore(state / "images")
    digests = {name: store.get(name).digest for name in ("built", "mini", "small")}
    return state, digests


def policy_file(state: Path, digests: dict[str, str], user: str = "1000:1000") -> Path:
    path = state.parent / f"policy-{user.replace(':', '-')}.yaml"
    # root's runs get their own (session) workspace: root inside has no
    # CAP_DAC_OVERRIDE, so it cannot enter the tenant workspace uid 1000 made.
    scope = "tenant" if user == "1000:1000" else "session"
    path.write_text(POLICY.format(user=user, scope=scope, digest=digests["built"]))
    return path


SAME = """\
while read k v rest; do case $k in Uid:|Gid:) echo $v;; esac; done < /proc/self/status
echo x > /tmp/t && echo tmp-ok; echo $image > /workspace/last; pwd
"""
"""Shell builtins only (the mini image has nothing else): user, /tmp, /workspace."""


async def test_commands_run_in_each_image_and_the_receipt_names_its_digest(serve, images_state):
    state, digests = images_state
    expect = {
        "host": (None, "ID=debian"),
        "built": (digests["built"], "jq-1.6"),
        "pulled": (digests["small"], "second layer"),
        "mini": (digests["mini"], "mini image"),
        "pinned": (digests["built"], "jq-1.6"),
    }
    scripts = {
        "host": "grep ^ID= /etc/os-release",
        "built": "jq --version",
        "pulled": "cat /etc/pulled-marker",
        "mini": "read line < /etc/marker; echo $line",
        "pinned": "jq --version",
    }
    async with serve("--policy", str(policy_file(state, digests)), "--pool-size", "0", state_dir=state) as c:
        for image, (digest, out) in expect.items():
            s = await ok(c, scripts[image], image=image)
            assert out in s["stdout"], (image, s)
            receipt = s["limits"]
            assert receipt.get("image_digest") == digest, (
                image,
                receipt,
            )  # compact receipt: a plain dict from the wire
            entry = next(e for e in receipt["entries"] if e["field"] == "image")
            assert entry["granted"] == image
            # The same user, /tmp and /workspace in every image.
            s = await ok(c, SAME, image=image, env={"image": image})
            assert s["stdout"] == "1000\n1000\ntmp-ok\n/workspace\n", (image, s)
        s = await ok(c, "cat /workspace/last", image="built")
        assert s["stdout"] == "pinned\n"


async def test_the_root_is_read_only_unless_the_policy_makes_it_writable(serve, images_state):
    state, digests = images_state
    store = ImageStore(state / "images")
    rootfs = Path(store.get("built").rootfs)
    before = sorted(os.listdir(rootfs / "usr" / "local" / "bin"))
    async with serve("--policy", str(policy_file(state, digests, "0:0")), "--pool-size", "0", state_dir=state) as c:
        s = structured(await run(c, command="echo x > /usr/local/bin/probe; echo rc=$?", image="built"))
        assert "Read-only file system" in s["stderr"] and s["stdout"] == "rc=2\n", s
        # Writable: a package installs and works within the run ...
        install = r"""
set -e
mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/bin
printf 'Package: gvisor-mcp-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n' > /tmp/pkg/DEBIAN/control
printf '#!/bin/sh\necho hello from a package\n' > /tmp/pkg/usr/bin/gvisor-mcp-hello
chmod 755 /tmp/pkg/usr/bin/gvisor-mcp-hello
dpkg-deb --build /tmp/pkg /tmp/hello.deb >/dev/null
dpkg -i /tmp/hello.deb >/dev/null
gvisor-mcp-hello
dpkg -s gvisor-mcp-hello | grep Status
"""
        s = await ok(c, install, image="rw")
        assert s["stdout"] == "hello from a package\nStatus: install ok installed\n", s
        # ... and is gone in the next run, and never reached the image on the host.
        s = structured(await run(c, command="command -v gvisor-mcp-hello || echo gone", image="rw"))
        assert s["stdout"] == "gone\n"
        assert sorted(os.listdir(rootfs / "usr" / "local" / "bin")) == before
        assert not (rootfs / "usr" / "bin" / "gvisor-mcp-hello").exists()
        # The overlay's writes are the run's memory: 400 MiB into a 256 MiB run is an OOM kill.
        s = structured(await run(c, command="head -c 400M /dev/zero > /opt/big; echo survived", image="rw"))
        assert s["status"] == "oom_killed" and "survived" not in s["stdout"], s
        assert s["peak_memory_bytes"] >= 200 * 1024 * 1024  # the run's own memory filled up


async def test_an_unknown_image_gets_the_policy_error_listing_the_allowed_ones(serve, images_state):
    state, digests = images_state
    async with serve("--policy", str(policy_file(state, digests)), "--pool-size", "0", state_dir=state) as c:
        r = await run(c, command="true", image="ubuntu")
        assert r.is_error
        message = text(r)
        assert "ubuntu" in message
        for name in ("host", "built", "rw", "pulled", "mini", "pinned"):
            assert name in message


async def test_rm_of_an_image_a_run_uses_is_refused_naming_the_run(serve, images_state):
    state, digests = images_state
    async with serve("--policy", str(policy_file(state, digests)), "--pool-size", "0", state_dir=state) as c:
        s = structured(await run(c, command="sleep 60", image="pulled", background=True))
        rid = s["result_id"]
        r = cli("image", "rm", "small", "--state-dir", str(state))
        assert r.returncode == 1 and f"run {rid}" in r.stderr and "in use" in r.stderr, r.stderr
        await c.call_tool("cancel_command", {"result_id": rid})
    # The server is gone: nothing uses the image any more.
    store = ImageStore(state / "images")
    assert store.users("small") == []


def test_policy_check_names_missing_store_images_and_how_to_get_them(tmp_path, images_state):
    state, digests = images_state
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nimages:\n  catalog:\n    agent: {store: agent}\n    built: {store: built}\n"
        f'    old: {{store: "built@sha256:{"0" * 64}"}}\n  allowed: [host, agent, built, old]\n'
    )
    r = cli("policy", "check", str(policy), "--state-dir", str(state))
    assert r.returncode == 1
    assert "images.catalog.agent: image 'agent' is not in the image store" in r.stderr
    assert "gvisor-mcp image build agent" in r.stderr and "image pull REF --name agent" in r.stderr
    assert "images.catalog.old:" in r.stderr and "now points at " + digests["built"] in r.stderr
    assert "images.catalog.built" not in r.stderr
    r = cli("policy", "check", str(policy), "--no-path-checks")
    assert r.returncode == 0, r.stderr
    ok_policy = tmp_path / "ok.yaml"
    ok_policy.write_text("version: 1\nimages:\n  catalog:\n    built: {store: built}\n  allowed: [host, built]\n")
    assert cli("policy", "check", str(ok_policy), "--state-dir", str(state)).returncode == 0


def test_serve_refuses_a_policy_whose_store_images_are_missing(tmp_path, sandbox_base):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nimages:\n  catalog:\n    agent: {store: agent}\n  allowed: [host, agent]\n")
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("gvisor-mcp")),
            "serve",
            "--policy",
            str(policy),
            "--state-dir",
            str(tmp_path / "state"),
            "--state-root",
            str(sandbox_base),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert "image 'agent' is not in the image store" in r.stderr and "image build agent" in r.stderr


def test_a_store_image_without_the_workspace_mount_point_is_refused_by_policy_check(tmp_path, images_state):
    state, _ = images_state
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nworkspace: {mount: /data}\nimages:\n  catalog:\n    mini: {store: mini}\n  allowed: [host, mini]\n"
    )
    r = cli("policy", "check", str(policy), "--state-dir", str(state))
    assert r.returncode == 1 and "has no directory /data for the workspace mount" in r.stderr, r.stderr


def test_inspect_shows_what_the_receipt_pins(images_state):
    state, digests = images_state
    for name, digest in digests.items():
        out = json.loads(cli("image", "inspect", name, "--state-dir", str(state), check=True).stdout)
        assert out["digest"] == digest


async def test_the_warm_pool_serves_a_store_image_and_follows_its_name(serve, images_state):
    """Default image `agent` (a store name): pooled runs are warm and pinned
    by digest; the pool holds the image against `image rm`; when the name is
    moved to another image, the next run uses it and the pool moves too."""
    state, digests = images_state
    store = ImageStore(state / "images")
    store.tag("built", "agent")
    policy = state.parent / "pool.yaml"
    policy.write_text(
        "version: 1\ndefaults: {image: agent, memory: 256MiB}\nworkspace: {scope: tenant, size: 32MiB}\n"
        "images:\n  catalog:\n    agent: {store: agent}\n    built: {store: built}\n"
        "  allowed: [host, agent, built]\n"
    )
    try:
        async with serve("--policy", str(policy), "--pool-size", "1", state_dir=state) as c:
            s = await _warm(c, "jq --version")
            assert s["limits"]["image_digest"] == digests["built"] and s["stdout"] == "jq-1.6\n"
            r = cli("image", "rm", "agent", "--state-dir", str(state))
            assert r.returncode == 1 and "the warm pool of server pid" in r.stderr, r.stderr
            # Rebuilt (here: the name moved to the pulled image): the next run gets it ...
            cli("image", "tag", "small", "agent", "--state-dir", str(state), check=True)
            s = await ok(c, "cat /etc/pulled-marker")
            assert s["limits"]["image_digest"] == digests["small"], s
            # ... and the pool boots the new image and lets go of the old one.
            s = await _warm(c, "cat /etc/pulled-marker")
            assert s["limits"]["image_digest"] == digests["small"]
            users = "\n".join(store.users("built"))
            assert "warm pool" not in users, users
    finally:
        if "agent" in store.names():
            store.remove("agent")


async def _warm(client, command: str, tries: int = 40) -> dict:
    """Run until a call is served by the warm pool (it boots in the background)."""
    import anyio

    for _ in range(tries):
        s = await ok(client, command)
        if s["warm"]:
            return s
        await anyio.sleep(0.5)
    raise AssertionError(f"no warm run in {tries} tries: {s}")
