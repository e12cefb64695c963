"""container_path_exists: symlinks resolve as CONTAINER paths, never on the host.

The server checks a requested workdir before runsc starts (runsc would
otherwise create a missing one on the host, even inside a read-only bind).
An agent controls its workspace, so it can plant links there; the check must
answer exactly as the container would see the path, and never reveal whether
a directory exists on the host. tests/adversarial/test_paths.py checks the
same through the MCP server.
"""

from __future__ import annotations

import os

from gvisor_mcp.sandbox.rootfs import container_path_exists


def plan(tmp_path):
    ws = tmp_path / "ws"
    etc = tmp_path / "etc"  # the generated /etc: no apt, no ssh
    ws.mkdir()
    etc.mkdir()
    (ws / "real").mkdir()
    binds = [("/usr", "/usr"), ("/etc", str(etc)), ("/workspace", str(ws))]
    return ws, etc, binds, ["/tmp"]


def exists(path, binds, tmpfs, rootfs=None):
    return container_path_exists(path, rootfs, binds, tmpfs)


def test_plain_paths(tmp_path):
    ws, _, binds, tmpfs = plan(tmp_path)
    assert exists("/workspace", binds, tmpfs)
    assert exists("/workspace/real", binds, tmpfs)
    assert not exists("/workspace/missing", binds, tmpfs)
    assert exists("/usr/bin", binds, tmpfs)
    assert exists("/tmp", binds, tmpfs) and not exists("/tmp/x", binds, tmpfs)
    assert exists("/", binds, tmpfs) and exists("/proc", binds, tmpfs)
    assert not exists("/proc/self/fd/3", binds, tmpfs)
    (ws / "file").write_text("x")
    assert not exists("/workspace/file", binds, tmpfs)


def test_a_planted_link_to_etc_means_the_containers_etc(tmp_path):
    ws, etc, binds, tmpfs = plan(tmp_path)
    os.symlink("/etc", ws / "hostetc")
    assert os.path.isdir("/etc/apt") or os.path.isdir("/etc/ssh")  # exists on the host...
    for name in ("apt", "ssh", "nonexistent-zz"):
        assert not exists(f"/workspace/hostetc/{name}", binds, tmpfs)  # ...not in the container
    assert exists("/workspace/hostetc", binds, tmpfs)  # the container's /etc
    (etc / "sub").mkdir()
    assert exists("/workspace/hostetc/sub", binds, tmpfs)


def test_relative_links_dotdot_and_loops(tmp_path):
    ws, _, binds, tmpfs = plan(tmp_path)
    os.symlink("../../../../../../etc", ws / "up")  # can climb to the container's / only
    assert exists("/workspace/up", binds, tmpfs)
    assert not exists("/workspace/up/apt", binds, tmpfs)
    os.symlink("real", ws / "rel")
    assert exists("/workspace/rel", binds, tmpfs)
    os.symlink("/workspace/usrlink/bin", ws / "chain")
    os.symlink("/usr", ws / "usrlink")
    assert exists("/workspace/chain", binds, tmpfs)
    os.symlink("loop2", ws / "loop1")
    os.symlink("loop1", ws / "loop2")
    assert not exists("/workspace/loop1", binds, tmpfs)


def test_links_inside_an_image_directory_stay_inside_it(tmp_path):
    image = tmp_path / "image"
    (image / "data").mkdir(parents=True)
    os.symlink("/etc", image / "etc-link")  # the image's /etc, which has no apt
    assert exists("/data", [], [], rootfs=str(image))
    assert not exists("/etc-link/apt", [], [], rootfs=str(image))
