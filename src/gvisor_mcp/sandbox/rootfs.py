"""The built-in default image: the host's programs, none of the host's secrets.

An empty read-only root with host /usr (and /bin, /lib, /lib64, /sbin, which
are symlinks into /usr on Debian 12, or read-only binds where they are real
directories), a generated minimal /etc, and a size-bounded /tmp. Never the
host's /etc (root inside could read /etc/shadow), /root, /home, /var or any
socket.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
"""Host directories shared read-only (those that exist)."""

DEFAULT_TMP_MB = 256
"""Size of /tmp in the default image; tmpfs memory counts against the run's memory limit."""

SANDBOX_UID = 1000
ETC_FILES: dict[str, str] = {
    "passwd": (
        "root:x:0:0:root:/tmp:/bin/sh\n"
        f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/tmp:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": "# no resolver: network is off unless the policy enabled it\nnameserver 127.0.0.1\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "hostname": "sandbox\n",
}


def write_etc(directory: Path) -> Path:
    """Write the generated /etc into `directory` (idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in ETC_FILES.items():
        path = directory / name
        if not path.exists() or path.read_text() != content:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(content)
            os.chmod(tmp, 0o644)
            tmp.replace(path)
    return directory


def host_system_entries() -> list[tuple[str, str | None]]:
    """(name, symlink target or None for a real directory) for each SYSTEM_DIRS present."""
    entries: list[tuple[str, str | None]] = []
    for name in SYSTEM_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            target = os.readlink(host)
            if host.exists():
                entries.append((name, target))
        elif host.is_dir():
            entries.append((name, None))
    return entries


def make_root(root: Path, mountpoints: list[str], system: list[tuple[str, str | None]]) -> None:
    """Create an empty per-run root directory with every mountpoint present.

    runsc creates a missing mountpoint or cwd inside the host directory even
    when the root is read-only, so everything it could need is made here, in
    the run's own bundle, which is deleted with the run.
    """
    root.mkdir(mode=0o755)
    for name, target in system:
        if target is not None:
            os.symlink(target, root / name)
        else:
            (root / name).mkdir()
    for d in ("proc", "dev", "sys", "etc", "tmp"):
        (root / d).mkdir(exist_ok=True)
    for dest in mountpoints:
        rel = posixpath.normpath(dest).lstrip("/")
        if rel:
            (root / rel).mkdir(parents=True, exist_ok=True)


MAX_SYMLINKS = 40
"""Like Linux's limit on symlinks followed while resolving one path."""


def container_path_exists(
    path: str,
    rootfs: str | None,
    binds: list[tuple[str, str]],
    tmpfs: list[str],
) -> bool:
    """Whether `path` will be a directory inside the container.

    Resolves as the container will, one component at a time: each prefix is
    looked up through its longest mount (a bind maps to its host source, a
    tmpfs holds only its own root, the rest is the image; the default image
    holds only its mountpoints and the host system dirs), and a symlink is
    read, never followed by the host: its target is resolved again as a
    CONTAINER path. A link an agent planted in its workspace pointing at
    /etc means the sandbox's /etc here too, so the answer can never tell
    anything about the host's /etc (nor make runsc create a directory there).
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component is pending[-1]
    current = "/"
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = posixpath.dirname(current)
            continue
        candidate = posixpath.join(current, name)
        kind, host = _lookup(candidate, rootfs, binds, tmpfs)
        if kind == "dir":
            current = candidate
            continue
        if kind == "missing":
            return False
        try:  # kind == "host": a path inside a bind source or the image directory
            st = os.lstat(host)
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode):
            current = candidate
        elif stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return False
            try:
                target = os.readlink(host)
            except OSError:
                return False
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
        else:
            return False
    return True


def _lookup(
    path: str, rootfs: str | None, binds: list[tuple[str, str]], tmpfs: list[str]
) -> tuple[str, str]:
    """("dir", "") for a directory the container is known to have, ("missing", "")
    for one it cannot have, or ("host", host path) to lstat (never stat)."""
    best, kind, source = "", "", ""
    for dest, src in binds:
        if (path == dest or path.startswith(dest.rstrip("/") + "/")) and len(dest) > len(best):
            best, kind, source = dest, "bind", src
    for dest in tmpfs:
        if (path == dest or path.startswith(dest.rstrip("/") + "/")) and len(dest) > len(best):
            best, kind, source = dest, "tmpfs", ""
    if kind == "bind":
        if path == best:  # the mountpoint: the server's own source directory
            return ("dir", "") if Path(source).is_dir() else ("missing", "")
        return "host", os.path.join(source, path[len(best):].lstrip("/"))
    if kind == "tmpfs":
        return ("dir", "") if path == best else ("missing", "")
    if rootfs is not None:
        return "host", os.path.join(rootfs, path.lstrip("/"))
    # Default image: its fixed directories and the parents of every mountpoint.
    made = {"/", "/proc", "/dev", "/sys", "/etc", "/tmp"}
    for dest in [d for d, _ in binds] + tmpfs:
        while dest not in ("/", ""):
            made.add(dest)
            dest = posixpath.dirname(dest)
    return ("dir", "") if path in made else ("missing", "")
