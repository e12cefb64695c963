"""What the store does to, and reads from, an unpacked root filesystem.

Every path below the root is opened from a directory fd without following
symlinks: an image is hostile input even after it was unpacked (a planted
`etc/passwd -> /etc/shadow` must not make the store read or write the
host's file).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from ..sandbox.rootfs import SANDBOX_UID

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

MOUNTPOINTS: tuple[tuple[str, int], ...] = (
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("etc", 0o755),
    ("run", 0o755),
    ("workspace", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
)
"""Directories every store image gets (when it has nothing there): the
sandbox's mounts. runsc creates a missing bind-mount point inside the image
directory on the host, which would change an image that must never change;
with these present it never has to (see sandbox.spec.check_mountpoints)."""

SANDBOX_PASSWD = f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/tmp:/bin/sh\n"
SANDBOX_GROUP = f"sandbox:x:{SANDBOX_UID}:\n"
MAX_DB_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TreeInfo:
    digest: str
    """`sha256:` + hex over the canonical listing of every entry (see tree_digest)."""
    size: int
    """Bytes of regular files."""
    entries: int


def open_dir(root_fd: int, rel: str) -> int:
    """An fd of directory `rel` below `root_fd`; OSError (ELOOP/ENOTDIR) through links."""
    fd = os.dup(root_fd)
    for part in [p for p in rel.split("/") if p]:
        try:
            nfd = os.open(part, _DIR, dir_fd=fd)
        finally:
            os.close(fd)
        fd = nfd
    return fd


def read_file(root_fd: int, rel: str, limit: int = MAX_DB_BYTES) -> bytes | None:
    """A regular file's bytes, or None when it is missing, a link, not regular, or too big."""
    parent, _, name = rel.rpartition("/")
    try:
        d = open_dir(root_fd, parent)
    except OSError:
        return None
    try:
        fd = os.open(name, _FILE, dir_fd=d)
    except OSError:
        return None
    finally:
        os.close(d)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks = []
        while data := os.read(fd, 1024 * 1024):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def finalize(root_fd: int) -> list[str]:
    """Make an unpacked tree ready to run; returns what was changed.

    - the mountpoint directories (MOUNTPOINTS) where nothing is in the way;
    - a `sandbox` user and group with id 1000 (the policy's default user)
      when the image has no user/group of that id, so `id -un`, `whoami`
      and programs that look up their own user work as in the host image.
    """
    changes = []
    made = []
    for rel, mode in MOUNTPOINTS:
        parent, _, name = rel.rpartition("/")
        try:
            d = open_dir(root_fd, parent)
        except OSError:
            continue  # something that is not a directory is in the way: leave it
        try:
            os.mkdir(name, mode, dir_fd=d)
            fd = os.open(name, _DIR, dir_fd=d)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            made.append(f"/{rel}")
        except FileExistsError:
            pass
        finally:
            os.close(d)
    if made:
        changes.append(f"created mountpoint directories {', '.join(made)}")
    for name, line, default in (
        ("passwd", SANDBOX_PASSWD, "root:x:0:0:root:/root:/bin/sh\n"),
        ("group", SANDBOX_GROUP, "root:x:0:\n"),
    ):
        if _add_id_line(root_fd, name, line, default):
            changes.append(f"added a sandbox entry ({SANDBOX_UID}) to /etc/{name}")
    return changes


def _add_id_line(root_fd: int, name: str, line: str, default: str) -> bool:
    try:
        etc = open_dir(root_fd, "etc")
    except OSError:
        return False
    try:
        try:
            st = os.stat(name, dir_fd=etc, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            return False  # a link or something odd: the image's business, never followed
        current = (read_file(root_fd, f"etc/{name}") or b"").decode("utf-8", "replace") if st else default
        for existing in current.splitlines():
            fields = existing.split(":")
            if len(fields) >= 3 and fields[2] == str(SANDBOX_UID):
                return False
            if fields and fields[0] == "sandbox":
                return False
        text = current + ("" if not current or current.endswith("\n") else "\n") + line
        tmp = f".{name}.gvisor-mcp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=etc)
        try:
            os.write(fd, text.encode())
            os.fchmod(fd, st.st_mode & 0o777 if st else 0o644)
            if st:
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=etc, dst_dir_fd=etc)
        return True
    finally:
        os.close(etc)


def tree_info(root_fd: int) -> TreeInfo:
    """The content digest of a tree: sha256 over one line per entry, sorted by path:
    path, type, permission bits, owner, size, and the file's sha256 or the
    link's target. Timestamps are left out, so the same content gives the
    same digest however and whenever it was unpacked."""
    records: list[bytes] = []
    size = 0
    for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=root_fd):
        base = dirpath[2:] if dirpath.startswith("./") else ("" if dirpath == "." else dirpath)
        for name in dirnames + filenames:
            rel = f"{base}/{name}" if base else name
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            kind, payload = "?", b""
            if stat.S_ISDIR(st.st_mode):
                kind = "d"
            elif stat.S_ISLNK(st.st_mode):
                kind, payload = "l", os.fsencode(os.readlink(name, dir_fd=dfd))
            elif stat.S_ISREG(st.st_mode):
                kind, payload = "f", _sha256(dfd, name).encode()
                size += st.st_size
            head = b"%s\0%s\0%o\0%d\0%d\0%d\0" % (
                os.fsencode(rel),
                kind.encode(),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if kind == "f" else 0,
            )
            records.append(head + payload + b"\n")
    records.sort()
    h = hashlib.sha256()
    for r in records:
        h.update(r)
    return TreeInfo(digest="sha256:" + h.hexdigest(), size=size, entries=len(records))


def _sha256(dir_fd: int, name: str) -> str:
    fd = os.open(name, _FILE, dir_fd=dir_fd)
    try:
        h = hashlib.sha256()
        while data := os.read(fd, 1024 * 1024):
            h.update(data)
        return h.hexdigest()
    finally:
        os.close(fd)


def installed_packages(root_fd: int) -> list[str] | None:
    """`name=version` of every installed package (dpkg or apk database), or None if neither."""
    dpkg = read_file(root_fd, "var/lib/dpkg/status")
    if dpkg is not None:
        out = []
        for stanza in dpkg.decode("utf-8", "replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith((" ", "\t")):
                    fields[key] = value.strip()
            if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
                out.append(f"{fields['Package']}={fields.get('Version', '')}")
        return sorted(out)
    apk = read_file(root_fd, "lib/apk/db/installed")
    if apk is not None:
        out = []
        for stanza in apk.decode("utf-8", "replace").split("\n\n"):
            fields = dict((line[0], line[2:]) for line in stanza.splitlines() if len(line) > 2 and line[1] == ":")
            if fields.get("P"):
                out.append(f"{fields['P']}={fields.get('V', '')}")
        return sorted(out)
    return None


def lookup(root_fd: int, path: str, max_links: int = 40) -> os.stat_result | None:
    """Stat `path` as the sandbox will see it: symlinks resolve against the
    image's own root (never the host's), `..` stops at the root. None when
    it does not exist or loops."""
    pending = [p for p in path.split("/") if p not in ("", ".")][::-1]
    current: list[str] = []
    links = 0
    st: os.stat_result | None = None
    while pending:
        name = pending.pop()
        if name == "..":
            if current:
                current.pop()
            continue
        try:
            d = open_dir(root_fd, "/".join(current))
        except OSError:
            return None
        try:
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
            target = os.readlink(name, dir_fd=d) if stat.S_ISLNK(st.st_mode) else None
        except OSError:
            return None
        finally:
            os.close(d)
        if target is not None:
            links += 1
            if links > max_links:
                return None
            if target.startswith("/"):
                current = []
            pending.extend([p for p in target.split("/") if p not in ("", ".")][::-1])
            st = None
            continue
        if stat.S_ISDIR(st.st_mode):
            current.append(name)
        elif pending:
            return None
    if st is None:  # the path was the root, or ended at a link to a directory
        try:
            d = open_dir(root_fd, "/".join(current))
        except OSError:
            return None
        try:
            return os.fstat(d)
        finally:
            os.close(d)
    return st


def has_shell(root_fd: int) -> bool:
    """Whether /bin/sh is a regular file inside the image (the policy runs `/bin/sh -c`)."""
    st = lookup(root_fd, "/bin/sh")
    return st is not None and stat.S_ISREG(st.st_mode)
