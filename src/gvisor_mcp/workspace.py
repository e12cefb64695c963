"""Workspaces with a size limit: each workspace directory is a loop-mounted ext4 image.

The policy's `workspace.size` is enforced by the kernel, not by counting: the
directory a sandbox binds as its workspace is the mountpoint of a sparse ext4
image of exactly that size, so a command that writes a huge file, or creates
files until something breaks, gets ENOSPC inside the sandbox and the host's
own filesystem is never touched beyond the image's size (blocks AND inodes).

Layout, under the server's workspace root (`<state_dir>/workspaces`):

    <tenant>/shared                          scope tenant: the mountpoint
    <tenant>/sessions/<session>              scope session: the mountpoint
    .images/<tenant>/shared.img              the image (sparse; apparent size = workspace.size)
    .images/<tenant>/shared.img.lock         serialises mount/unmount between processes
    .images/<tenant>/sessions/<session>.img  (+ .lock)

`.images` can never collide with a tenant directory: kept tenant names start
with a letter or digit, hashed ones with `@` (see policy.path_component).

Life cycle:

- created and mounted on first use (`ensure`); scope session: unmounted and
  deleted with the session (`release(remove=True)`); scope tenant: unmounted
  when the last server using it stops, kept, and mounted again on next use.
- Several server processes may share one state directory. Each process that
  uses an image holds a SHARED flock on the image file for as long as it uses
  it; the kernel drops it when the process dies, however it dies. Mounting and
  unmounting happen under an EXCLUSIVE flock on `<image>.lock`: a process that
  finds the image already mounted at its mountpoint (a neighbour's mount)
  reuses it and never mounts it a second time; a process that stops unmounts
  only if it can take an exclusive lock on the image, i.e. nobody else uses it.
- `cleanup_stale` (server start-up, after the Manager has reaped dead
  servers' sandboxes) unmounts images that no live process holds, and deletes
  the session images of dead servers.

The mounts are `nosuid,nodev` (inside the sandbox the bind is nosuid/nodev
too) and `discard`, so files deleted in the workspace give their blocks back
to the host.

Why over ~400 lines: mkfs, loop mounts, the holders' locks and stale-mount
cleanup are one resource's lifecycle; its locking is only correct read as a
whole.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .errors import InfrastructureError

log = structlog.get_logger("gvisor_mcp.workspace")

IMAGES_DIR = ".images"
IMAGE_SUFFIX = ".img"
LOCK_SUFFIX = ".lock"
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,discard,errors=remount-ro"
TOOLS = ("mkfs.ext4", "mount", "umount")
INODE_RATIO = 8192
"""Bytes of workspace per inode: a 1 GiB workspace holds up to 131072 files."""
COMMAND_TIMEOUT = 60.0
HELD_ELSEWHERE_WAIT = 5.0
"""Seconds to wait for a loop device of a dead server's namespace to detach."""


class WorkspaceError(InfrastructureError, RuntimeError):
    """A workspace could not be prepared; the message says why and what to do."""


@dataclass
class _Held:
    root: Path
    mountpoint: Path
    image: Path
    fd: int
    """Shared flock on the image: "this process uses it"."""
    scope: str


_held: dict[Path, _Held] = {}
"""Images this process uses, by mountpoint (process-wide: HTTP serves several tenants)."""


# --- support -----------------------------------------------------------------


def support_problem() -> str | None:
    """Why size-limited workspaces cannot work on this machine, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"{', '.join(missing)} not found on PATH (Debian: apt-get install e2fsprogs mount; scripts/setup.sh does)"
        )
    if os.geteuid() != 0:
        return "mounting workspace images needs root"
    if not Path("/dev/loop-control").exists():
        return (
            "no loop device support (/dev/loop-control is missing): load the `loop` kernel "
            "module, or give this container access to loop devices"
        )
    if not _ext4_available():
        return "the kernel has no ext4 support (not in /proc/filesystems, no ext4 module)"
    return None


def _ext4_available() -> bool:
    try:
        if any(
            line.split()[-1] == "ext4" for line in Path("/proc/filesystems").read_text().splitlines() if line.strip()
        ):
            return True
    except OSError:
        return False
    return Path("/lib/modules", platform.release(), "kernel/fs/ext4").exists()


def policy_needs_images(policy: Any) -> bool:
    """Whether any tenant of `policy` mounts a workspace (every workspace has a size)."""
    return any(policy.tenant(name).workspace.enabled for name in policy.tenant_names)


def check_support(policy: Any) -> None:
    """Raise WorkspaceError when `policy` enables a workspace this machine cannot bound.

    Fail closed: a workspace whose size cannot be enforced is never served
    as an unbounded directory.
    """
    if not policy_needs_images(policy):
        return
    problem = support_problem()
    if problem:
        raise WorkspaceError(
            f"the policy enables a workspace with a size limit (workspace.size), which is "
            f"enforced with a loop-mounted ext4 image, but {problem}. Fix that, or set "
            "`workspace: {enabled: false}` in the policy; workspaces are never served unbounded."
        )


# --- paths -------------------------------------------------------------------


def image_path(root: Path, mountpoint: Path) -> Path:
    """`<root>/.images/<relative mountpoint>.img`."""
    rel = mountpoint.relative_to(root)
    if not rel.parts or rel.parts[0] == IMAGES_DIR or ".." in rel.parts:
        raise WorkspaceError(f"workspace {mountpoint} is not a workspace directory under {root}")
    return root / IMAGES_DIR / rel.parent / (rel.name + IMAGE_SUFFIX)


def _lock_path(image: Path) -> Path:
    return image.with_name(image.name + LOCK_SUFFIX)


# --- mount table ---------------------------------------------------------------


def _unescape(field: str) -> str:
    """Octal escapes of /proc/self/mountinfo (space, tab, newline, backslash)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _loop_backing_file(device: str) -> Path | None:
    name = os.path.basename(device)
    if not name.startswith("loop"):
        return None
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return Path(text.removesuffix(" (deleted)"))


def loop_mounts(pid: int | str = "self") -> list[tuple[Path, Path]]:
    """(mountpoint, backing file) of every loop-device mount in the mount
    namespace of `pid` (default: ours)."""
    out: list[tuple[Path, Path]] = []
    try:
        lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        backing = _loop_backing_file(rest[1])
        if backing is not None:
            out.append((Path(_unescape(fields[4])), backing))
    return out


def loop_devices() -> list[tuple[str, Path]]:
    """(device, backing file) of every attached loop device, in any mount namespace."""
    out: list[tuple[str, Path]] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for name in names:
        backing = _loop_backing_file(name)
        if backing is not None:
            out.append((f"/dev/{name}", backing))
    return out


def _held_elsewhere(image: Path) -> str | None:
    """The loop device holding `image` though no mount of it is in our namespace.

    With each server in a mount namespace (mountns.py), that is a server of
    another namespace, or the sandboxes of a dead server still exiting. Two
    mounts of one ext4 image corrupt it: such an image is never mounted.
    Waits briefly for a loop device that is going away (the kernel detaches
    it when the last process of a dead namespace has exited).
    """
    deadline = time.monotonic() + HELD_ELSEWHERE_WAIT
    while True:
        devices = [dev for dev, backing in loop_devices() if backing == image]
        if not devices or time.monotonic() >= deadline:
            return devices[0] if devices else None
        time.sleep(0.1)


def _mounted_image(mountpoint: Path) -> Path | None:
    """The image mounted at `mountpoint` (the topmost mount), else None."""
    found = None
    for mp, backing in loop_mounts():
        if mp == mountpoint:
            found = backing
    return found


# --- locks and commands --------------------------------------------------------


@contextmanager
def _oplock(image: Path) -> Iterator[None]:
    """Exclusive: one process at a time mounts, unmounts or deletes `image`."""
    image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(_lock_path(image), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unused(image: Path) -> bool:
    """No process holds the image (call under its oplock, after dropping our own hold)."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _run(argv: list[str]) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WorkspaceError(f"{argv[0]} failed: {e}") from e
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip()[:500]
        raise WorkspaceError(f"{' '.join(argv)} failed (exit {r.returncode}): {detail}")


def _make_image(image: Path, size_mb: int, uid: int, gid: int, populate: Path | None) -> None:
    """A sparse ext4 image of `size_mb` MiB, atomically (a crash leaves only a temp file)."""
    tmp = image.with_name(f"{image.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        argv = [
            # -i: one inode per 8 KiB, whatever the host's mke2fs.conf says
            # (file-heavy trees like node_modules run out of inodes first).
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-i",
            str(INODE_RATIO),
            "-L",
            "gvisor-mcp-ws",
            "-E",
            f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1",
        ]
        if populate is not None:
            argv += ["-d", str(populate)]
        _run([*argv, str(tmp)])
        os.chmod(tmp, 0o600)
        os.replace(tmp, image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mount(image: Path, mountpoint: Path) -> None:
    _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)])


def _umount(mountpoint: Path) -> None:
    try:
        _run(["umount", str(mountpoint)])
    except WorkspaceError as e:
        # Busy (a process still has a file open): detach now, freed when it closes.
        log.warning("workspace_umount_lazy", mountpoint=str(mountpoint), error=str(e))
        _run(["umount", "-l", str(mountpoint)])


# --- the API the server uses ---------------------------------------------------


def ensure(root: Path, mountpoint: Path, size_mb: int, uid: int, gid: int, scope: str) -> bool:
    """Make `mountpoint` a mounted workspace image of `size_mb` MiB; idempotent.

    Creates the image on first use (owned by uid:gid, mode 0700 at its root),
    reuses a neighbour process's mount of the same image, and holds the image
    for this process until `release`. Returns True when it created the image.
    Raises WorkspaceError with an actionable message.
    """
    root = root.resolve()
    mountpoint = mountpoint.resolve()
    held = _held.get(mountpoint)
    if held is not None and os.path.ismount(mountpoint):
        return False
    image = image_path(root, mountpoint)
    created = False
    with _oplock(image):
        mounted = _mounted_image(mountpoint)
        if mounted is not None and mounted != image:
            raise WorkspaceError(
                f"workspace {mountpoint} has another filesystem mounted on it ({mounted}); refusing to use it"
            )
        if not mountpoint.is_dir():
            mountpoint.mkdir(parents=True, mode=0o700)
            os.chown(mountpoint, uid, gid)
        if not image.exists():
            if mounted is not None:
                raise WorkspaceError(f"workspace {mountpoint} is mounted but its image {image} is gone")
            # A directory from before workspaces had images keeps its files.
            populate = mountpoint if any(mountpoint.iterdir()) else None
            try:
                _make_image(image, size_mb, uid, gid, populate)
            except WorkspaceError as e:
                raise WorkspaceError(f"could not create the {size_mb} MiB workspace image for {mountpoint}: {e}") from e
            created = True
            if populate is not None:
                _clear(mountpoint)  # its files are in the image now
        elif image.stat().st_size != size_mb * 1024 * 1024:
            log.warning(
                "workspace_size_differs",
                image=str(image),
                size_mb=image.stat().st_size // (1024 * 1024),
                policy_size_mb=size_mb,
                note="the policy's size applies to new workspaces",
            )
        if mounted is None:
            device = _held_elsewhere(image)
            if device is not None:
                raise WorkspaceError(
                    f"workspace image {image} is mounted by a server process outside this server's "
                    f"mount namespace ({device}), and an ext4 image is never mounted twice. It is "
                    "freed when that server and its sandboxes have stopped; try again then"
                )
            _mount(image, mountpoint)
            if created:
                lost = mountpoint / "lost+found"
                if lost.is_dir() and not lost.is_symlink():
                    try:
                        lost.rmdir()
                    except OSError:
                        pass
                os.chmod(mountpoint, 0o700)
            log.info(
                "workspace_mounted", mountpoint=str(mountpoint), image=str(image), size_mb=size_mb, created=created
            )
        if held is None:
            fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            _held[mountpoint] = _Held(root, mountpoint, image, fd, scope)
    return created


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def release(mountpoint: Path, *, remove: bool) -> None:
    """This process stops using the workspace at `mountpoint`.

    Unmounts it when no other process uses it; with `remove` (scope session)
    also deletes the image and the mountpoint. Never raises (logs instead).
    """
    mountpoint = mountpoint.resolve()
    held = _held.pop(mountpoint, None)
    if held is None:
        if remove and mountpoint.is_dir() and not os.path.ismount(mountpoint):
            shutil.rmtree(mountpoint, ignore_errors=True)  # a plain directory (no image)
        return
    try:
        with _oplock(held.image):
            os.close(held.fd)
            if not _unused(held.image):
                return  # a neighbour process still uses it: it unmounts it when it stops
            _teardown(held.mountpoint, held.image, remove)
    except Exception as e:
        log.error("workspace_release_failed", mountpoint=str(mountpoint), error=str(e))


def release_all() -> None:
    """Release every workspace this process holds (sessions removed, tenants kept)."""
    for held in list(_held.values()):
        release(held.mountpoint, remove=held.scope == "session")


def held() -> list[Path]:
    return list(_held)


def _teardown(mountpoint: Path, image: Path, remove: bool) -> None:
    """Unmount (if ours is mounted), and with `remove` delete image, lock and mountpoint.

    Call under the image's oplock, with nobody holding the image.
    """
    if _mounted_image(mountpoint) == image:
        _umount(mountpoint)
        log.info("workspace_unmounted", mountpoint=str(mountpoint), removed=remove)
    if remove:
        image.unlink(missing_ok=True)
        _lock_path(image).unlink(missing_ok=True)
        if mountpoint.is_dir() and not os.path.ismount(mountpoint):
            shutil.rmtree(mountpoint, ignore_errors=True)


def cleanup_stale(root: Path) -> int:
    """Unmount workspace images under `root` that no live process uses; delete
    dead sessions' images and mountpoints. Returns how many were cleaned.

    Run at server start-up, after sandboxes of dead servers are gone (their
    sandboxes kept the mounts busy).
    """
    root = root.resolve()
    images_root = root / IMAGES_DIR
    if not images_root.is_dir():
        return 0
    cleaned = 0
    mounted = {backing: mp for mp, backing in loop_mounts() if _is_under(backing, images_root)}
    candidates: dict[Path, Path] = {}
    for image in images_root.rglob("*" + IMAGE_SUFFIX):
        mountpoint = root / image.relative_to(images_root).parent / image.name[: -len(IMAGE_SUFFIX)]
        candidates[image] = mountpoint
    for backing, mp in mounted.items():
        candidates.setdefault(backing, mp)
    for image, mountpoint in sorted(candidates.items()):
        if mountpoint.resolve() in _held:
            continue
        is_session = _is_session(root, mountpoint)
        if image not in mounted and not is_session:
            continue  # a kept tenant workspace, not mounted: nothing to do
        try:
            with _oplock(image):
                if not _unused(image):
                    continue  # a live neighbour's
                _teardown(mountpoint, image, remove=is_session)
                cleaned += 1
        except Exception as e:
            log.error("workspace_cleanup_failed", image=str(image), error=str(e))
    for tmp in images_root.rglob(f"*{IMAGE_SUFFIX}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
    if cleaned:
        log.info("workspace_cleanup_stale", cleaned=cleaned)
    return cleaned


def remove_unused(root: Path, mountpoint: Path) -> bool:
    """Delete a workspace (unmount, image, lock, mountpoint) that no process
    uses; False, and nothing touched, when a live server holds it.

    For `gvisor-mcp workspace rm`: the operator removes kept workspaces.
    """
    root, mountpoint = root.resolve(), mountpoint.resolve()
    image = image_path(root, mountpoint)
    if mountpoint in _held:
        return False
    with _oplock(image):
        if not _unused(image):
            return False
        _teardown(mountpoint, image, remove=True)
    return True


def in_use(image: Path) -> bool:
    """A live process holds this workspace image."""
    return not _unused(image)


def _is_session(root: Path, mountpoint: Path) -> bool:
    """`<tenant>/sessions/<session>` (three levels), not `<tenant>/shared` — even
    for a tenant named "sessions"."""
    try:
        parts = mountpoint.relative_to(root).parts
    except ValueError:
        return False
    return len(parts) == 3 and parts[1] == "sessions"


def _is_under(path: Path, directory: Path) -> bool:
    return directory == path or directory in path.parents


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "WorkspaceError",
    "check_support",
    "cleanup_stale",
    "ensure",
    "held",
    "image_path",
    "in_use",
    "loop_devices",
    "loop_mounts",
    "policy_needs_images",
    "release",
    "release_all",
    "remove_unused",
    "support_problem",
]
