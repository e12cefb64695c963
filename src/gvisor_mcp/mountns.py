"""The server's private mount namespace: workspace mounts the kernel takes down by itself.

Workspace images are loop-mounted ext4 (workspace.py). Mounted in the host's
mount namespace, a server that died without unmounting (SIGKILL, OOM, a
second signal while it cleaned up) left the mount and its loop device
attached with no process alive, until the next server start found them;
each `claude mcp list` leaked one (issue 14, finding 9). So `serve` first
moves into a mount namespace of its own:

- `unshare(CLONE_NEWNS)`, then every mount in it is made a *slave*: mounts
  the host makes later still appear in it, mounts the server makes never
  appear on the host;
- mount(8) attaches loop devices with LO_FLAGS_AUTOCLEAR (checked in
  tests/integration/test_workspace_images.py), so the loop device detaches
  when its last mount goes;
- when the last process in the namespace exits — the server and the runsc
  processes it started (they live in copies of it) — the kernel drops its
  mounts, and with them the loop devices. Nothing is left for anyone to
  clean, whatever killed the server.

Several servers on one state directory (HTTP and stdio servers of one
tenant, two Claude windows) must never mount one ext4 image twice: two
mounts of one image in two namespaces corrupt it. So servers of one
workspace root share ONE namespace: the first creates it, the next ones
join it with setns(2). Each member holds an exclusive flock on
`<workspaces>/.mntns/<pid>` (whose content is the namespace's inode) for its
whole life; a newcomer joins the namespace of any member whose lock is held,
and creates a new one only when none is (then no live server of that root
has a namespace). Within the shared namespace, workspace.py's existing
protocol applies unchanged (one mount per image, shared flocks, the last
user unmounts). The namespace lives while any member or sandbox does.

What is left uncovered: a server SIGKILLed while its sandboxes still run
keeps its namespace (and mounts) alive in those sandboxes until they are
killed — by the next server's start-up clean-up. A newcomer that finds no
live member then creates a new namespace, and an image still attached to a
loop device in the old one must not be mounted again: workspace.ensure()
refuses (after a short wait) to mount an image that a loop device we cannot
see already holds.

Joining needs a single-threaded process (setns/unshare of a mount namespace
is refused once threads share the filesystem context), so `enter` runs first
thing in `serve`. Where it cannot (not root, no CAP_SYS_ADMIN), the server
stays in the host's namespace and says so in its log: the workspace
clean-up at start-up then covers what a dead server left, as before.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from pathlib import Path

import structlog

log = structlog.get_logger("gvisor_mcp.mountns")

REGISTRY = ".mntns"
"""Under the workspace root (can never be a tenant's directory: see workspace.py)."""

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19

_member_fd: int | None = None
"""Our exclusive flock on `<registry>/<pid>`: "this namespace has a live server"."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def namespace_id(pid: int | str = "self") -> int:
    """The inode of a process's mount namespace (equal inodes: the same namespace)."""
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino


def enter(workspace_root: Path) -> str:
    """Move this process into the mount namespace shared by the servers of
    `workspace_root` (creating it when no live server has one). Returns what
    happened, for the start-up log; never raises."""
    global _member_fd
    if _member_fd is not None:
        return "already entered"
    if threading.active_count() > 1:
        return "host (threads already run; a mount namespace can only be entered before)"
    try:
        registry = workspace_root / REGISTRY
        registry.mkdir(parents=True, exist_ok=True, mode=0o700)
        guard = os.open(workspace_root / (REGISTRY + ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return f"host (cannot use {workspace_root}: {e})"
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        joined = _join_live_member(registry)
        if joined is None:
            libc = _libc()
            _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")
            how = "created"
        else:
            how = f"joined server {joined}"
        member = registry / str(os.getpid())
        fd = os.open(member, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(namespace_id()).encode())
        _member_fd = fd
        return how
    except OSError as e:
        return f"host ({e})"
    finally:
        os.close(guard)


def _join_live_member(registry: Path) -> int | None:
    """setns() into the namespace of a live member, removing stale entries; its pid."""
    for entry in sorted(registry.iterdir()):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held: its server is alive
            else:
                entry.unlink(missing_ok=True)  # its server died
                continue
            want = int(os.read(fd, 64) or b"0")
        finally:
            os.close(fd)
        try:
            ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # exited just now
        try:
            if os.fstat(ns).st_ino != want or want == namespace_id():
                if want == namespace_id():
                    return pid  # already in it (a member's child, say)
                continue  # not the namespace it registered (a recycled pid)
            cwd = os.getcwd()
            _check(_libc().setns(ns, CLONE_NEWNS), "setns(mount namespace)")
            os.chdir(cwd)  # setns moves the working directory to the namespace's root
            return pid
        finally:
            os.close(ns)
    return None


def leave_registry() -> None:
    """Drop our registry entry (at exit; the kernel drops the lock anyway)."""
    global _member_fd
    if _member_fd is None:
        return
    try:
        os.close(_member_fd)
    finally:
        _member_fd = None


__all__ = ["enter", "leave_registry", "namespace_id"]
