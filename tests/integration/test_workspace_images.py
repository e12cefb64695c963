"""Workspace images (src/gvisor_mcp/workspace.py) on real loop mounts.

No sandbox here: these check the host side of the size limit — that a
workspace is a mounted ext4 image of the policy's size, what happens to it
at release, and that two processes on one state directory never mount the
same image twice and clean up after each other when one is SIGKILLed.
Through the MCP server, tests/adversarial/test_workspace.py checks the same
limit from inside a sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gvisor_mcp import workspace
from gvisor_mcp.policy import loads

pytestmark = pytest.mark.runsc  # needs root and loop devices, like the sandboxes


@pytest.fixture
def root(tmp_path):
    if os.geteuid() != 0 or workspace.support_problem():
        pytest.skip(workspace.support_problem() or "needs root")
    r = tmp_path / "workspaces"
    r.mkdir()
    yield r
    left = mounts_under(r)
    for mp in left:  # never leave a mount behind, even when a test failed
        subprocess.run(["umount", "-l", str(mp)], check=False)
    assert left == [], f"mounts left behind: {left}"


def mounts_under(directory: Path) -> list[Path]:
    d = directory.resolve()
    return [mp for mp, _ in workspace.loop_mounts() if d in mp.parents]


def mount_count(mountpoint: Path) -> int:
    return sum(1 for mp, _ in workspace.loop_mounts() if mp == mountpoint.resolve())


def test_a_session_workspace_is_an_image_of_the_policy_size_and_goes_with_the_session(root):
    mp = root / "t1" / "sessions" / "s1"
    assert workspace.ensure(root, mp, 32, 1000, 1000, "session") is True
    image = workspace.image_path(root.resolve(), mp.resolve())
    assert image.stat().st_size == 32 * 1024 * 1024
    assert image.stat().st_blocks * 512 < 8 * 1024 * 1024  # sparse
    assert mount_count(mp) == 1
    st = mp.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1000, 0o700)
    assert list(mp.iterdir()) == []  # no lost+found for the agent to trip over
    assert os.statvfs(mp).f_files == 32 * 1024 * 1024 // workspace.INODE_RATIO  # not the host's mke2fs.conf
    # Idempotent: a second ensure neither re-creates nor mounts again.
    assert workspace.ensure(root, mp, 32, 1000, 1000, "session") is False
    assert mount_count(mp) == 1
    # The size holds: a write past it fails with ENOSPC, the image stays its size.
    with pytest.raises(OSError) as e:
        with open(mp / "big", "wb") as f:
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
    assert e.value.errno == 28  # ENOSPC
    assert image.stat().st_size == 32 * 1024 * 1024
    workspace.release(mp, remove=True)
    assert mount_count(mp) == 0
    assert not mp.exists() and not image.exists()
    assert not image.with_name(image.name + ".lock").exists()


def test_a_tenant_workspace_is_kept_unmounted_and_mounted_again(root):
    mp = root / "t1" / "shared"
    workspace.ensure(root, mp, 16, 1000, 1000, "tenant")
    (mp / "kept.txt").write_text("still here")
    workspace.release(mp, remove=False)
    assert mount_count(mp) == 0
    assert not (mp / "kept.txt").exists()  # the data lives in the image, not the host dir
    assert workspace.ensure(root, mp, 16, 1000, 1000, "tenant") is False
    assert (mp / "kept.txt").read_text() == "still here"
    workspace.release(mp, remove=False)
    assert mount_count(mp) == 0


def test_a_directory_from_before_images_keeps_its_files(root):
    mp = root / "t1" / "shared"
    (mp / "sub").mkdir(parents=True)
    (mp / "sub" / "old.txt").write_text("old data")
    os.symlink("/etc", mp / "link")
    workspace.ensure(root, mp, 16, 1000, 1000, "tenant")
    assert (mp / "sub" / "old.txt").read_text() == "old data"
    assert os.readlink(mp / "link") == "/etc"  # copied as a link, never followed
    workspace.release(mp, remove=False)
    assert list(mp.iterdir()) == []  # moved into the image, not left underneath


def test_something_else_mounted_on_the_workspace_is_refused(root, tmp_path):
    mp = root / "t1" / "shared"
    mp.mkdir(parents=True)
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(other)], check=True)
    subprocess.run(["mount", "-o", "loop", str(other), str(mp)], check=True)
    try:
        with pytest.raises(workspace.WorkspaceError, match="another filesystem"):
            workspace.ensure(root, mp, 16, 1000, 1000, "tenant")
    finally:
        subprocess.run(["umount", str(mp)], check=True)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gvisor_mcp import logs, workspace
    logs.configure("WARNING")  # stdout is our channel to the test
    root, mp, scope = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    workspace.ensure(root, mp, 16, 1000, 1000, scope)
    print("held", flush=True)
    if sys.argv[4] == "release":
        sys.stdin.readline()
        workspace.release(mp, remove=scope == "session")
        print("released", flush=True)
    time.sleep(600)
    """
)


def start_holder(root: Path, mp: Path, scope: str, mode: str = "hold") -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(mp), scope, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if line != "held\n":
        p.kill()
        p.wait()
        pytest.fail(f"holder did not start: {line!r}")
    return p


def test_two_processes_share_one_mount_and_the_last_one_unmounts(root):
    mp = root / "t1" / "shared"
    neighbour = start_holder(root, mp, "tenant", "release")
    try:
        assert mount_count(mp) == 1
        workspace.ensure(root, mp, 16, 1000, 1000, "tenant")  # reuses the neighbour's mount
        assert mount_count(mp) == 1
        (mp / "from-us").write_text("x")
        # We stop first: the neighbour still uses it, so it stays mounted.
        workspace.release(mp, remove=False)
        assert mount_count(mp) == 1 and (mp / "from-us").exists()
        # Start-up cleanup of another server never touches a live neighbour's mount.
        assert workspace.cleanup_stale(root) == 0
        assert mount_count(mp) == 1
        # The neighbour stops last: it unmounts.
        neighbour.stdin.write("\n")
        neighbour.stdin.flush()
        assert neighbour.stdout.readline() == "released\n"
        assert mount_count(mp) == 0
    finally:
        neighbour.kill()
        neighbour.wait()


@pytest.mark.parametrize("scope", ["session", "tenant"])
def test_a_sigkilled_holder_is_cleaned_up_at_the_next_start(root, scope):
    mp = root / "t1" / ("sessions/s1" if scope == "session" else "shared")
    holder = start_holder(root, mp, scope)
    (mp / "data").write_text("x")
    image = workspace.image_path(root.resolve(), mp.resolve())
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert mount_count(mp) == 1  # the kernel keeps a dead process's mount
    assert workspace.cleanup_stale(root) == 1
    assert mount_count(mp) == 0
    if scope == "session":
        assert not image.exists() and not mp.exists()  # that session is over
    else:
        assert image.exists()  # a tenant's files are kept
        workspace.ensure(root, mp, 16, 1000, 1000, "tenant")
        assert (mp / "data").read_text() == "x"
        workspace.release(mp, remove=False)
    assert workspace.cleanup_stale(root) == 0


def test_check_support_refuses_a_workspace_it_cannot_bound(monkeypatch):
    policy = loads("version: 1\n")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(workspace.WorkspaceError) as e:
        workspace.check_support(policy)
    msg = str(e.value)
    assert "mkfs.ext4" in msg and "e2fsprogs" in msg and "enabled: false" in msg
    # Without a workspace there is nothing to bound.
    workspace.check_support(loads("version: 1\nworkspace: {enabled: false}\n"))


def test_an_image_mounted_in_another_mount_namespace_is_never_mounted_again(root):
    """Two ext4 mounts of one image corrupt it. A server in another mount
    namespace (or a dead server's sandboxes still exiting) holds the image's
    loop device; ensure() refuses, saying why, instead of mounting it twice.
    The loop device mount(8) attaches is auto-clearing: when that namespace's
    last process exits, the kernel detaches it by itself."""
    mp = root / "t1" / "shared"
    assert workspace.ensure(root, mp, 16, 0, 0, "tenant") is True
    workspace.release(mp, remove=False)  # unmounted, image kept
    image = workspace.image_path(root.resolve(), mp.resolve())
    other = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -o loop,nosuid,nodev {image} {mp} && echo mounted && exec sleep 600",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "mounted"
        [(device, _)] = [d for d in workspace.loop_devices() if d[1] == image]
        name = os.path.basename(device)
        assert Path(f"/sys/block/{name}/loop/autoclear").read_text().strip() == "1"
        assert mount_count(mp) == 0  # not in our namespace
        with pytest.raises(workspace.WorkspaceError) as e:
            workspace.ensure(root, mp, 16, 0, 0, "tenant")
        assert "never mounted twice" in str(e.value) and device in str(e.value)
        assert mount_count(mp) == 0
    finally:
        other.kill()
        other.wait()
    for _ in range(100):  # the kernel detaches it once the namespace is gone
        if not [d for d in workspace.loop_devices() if d[1] == image]:
            break
        import time

        time.sleep(0.1)
    assert [d for d in workspace.loop_devices() if d[1] == image] == []
    assert workspace.ensure(root, mp, 16, 0, 0, "tenant") is False  # now it mounts
    workspace.release(mp, remove=False)
