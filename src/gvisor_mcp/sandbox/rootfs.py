"""The built-in default image: the host's programs, none of the host's secrets.

An empty root (writes land in the run's memory) with host /usr (and /bin,
/lib, /lib64, /sbin, which are symlinks into /usr on Debian 12, or
read-only binds where they are real directories), a read-only /etc, and a
size-bounded /tmp. The /etc is built here: the sandbox's own users and
names, plus an allowlisted copy of what /usr programs expect from the
host's /etc (alternatives, CA certificates, ld.so.cache, os-release, locale
and time zone settings, ...; see HOST_ETC). Never the host's /etc itself
(root inside could read /etc/shadow), /root, /home, /var or any socket.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import secrets
import shutil
import stat
import tempfile
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
"""Generated: the sandbox's own users and names, never the host's."""

HOST_ETC: tuple[str, ...] = (
    # alternatives: /usr/bin/awk -> /etc/alternatives/awk -> /usr/bin/mawk
    "alternatives",
    # TLS: the CA bundle and hashed links (never /etc/ssl/private), OpenSSL's config
    "ssl/certs",
    "ssl/openssl.cnf",
    # the dynamic loader, and what the system is
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "os-release",
    "debian_version",
    "lsb-release",
    "issue",
    "issue.net",
    # locale and time zone (the data itself is under /usr)
    "localtime",
    "timezone",
    "locale.alias",
    "locale.gen",
    # name databases libc and scripting languages read
    "protocols",
    "services",
    "rpc",
    "networks",
    "ethertypes",
    "host.conf",
    "gai.conf",
    "netconfig",
    "mime.types",
    "mailcap",
    "magic",
    "magic.mime",
    # shells and editors
    "shells",
    "profile",
    "bash.bashrc",
    "inputrc",
    "vim",
    "nanorc",
    "terminfo",
    "wgetrc",
    "manpath.config",
    "groff",
    # language runtimes' system configuration
    "python3",
    "python3.*",
    "perl",
    "java-*",
    "fonts",
    "xml",
    "ImageMagick-*",
)
"""What the built-in image copies from the host's /etc: what programs under
/usr expect to find there, nothing that can hold a secret. An allowlist:
no shadow, ssh host keys, ssl/private, sudoers, pip.conf/npmrc/gitconfig
(index and credential settings), environment, profile.d, apt, or any file
the host keeps from other users (only world-readable files are copied).
Entries may be fnmatch patterns on one component."""

HOST_ETC_MAX_FILE = 16 * 1024 * 1024
HOST_ETC_MAX_TOTAL = 64 * 1024 * 1024
"""Bounds on what is copied (a stray huge file under an allowed directory is skipped)."""


def _host_etc_entries(host_etc: Path) -> list[tuple[str, str, int, bytes]]:
    """(relative path, kind "d"/"f"/"l", mode, content or link target) for the
    allowlisted part of `host_etc`, parents first. Symlinks are copied as
    links (they resolve inside the sandbox, against its own /usr and /etc)."""
    out: dict[str, tuple[str, str, int, bytes]] = {}
    total = 0

    def add(rel: str) -> None:
        nonlocal total
        path = host_etc / rel
        try:
            st = os.lstat(path)
        except OSError:
            return
        parent = posixpath.dirname(rel)
        if parent and parent not in out:
            out[parent] = (parent, "d", 0o755, b"")
        if stat.S_ISLNK(st.st_mode):
            out[rel] = (rel, "l", 0o777, os.readlink(path).encode("utf-8", "surrogateescape"))
        elif stat.S_ISREG(st.st_mode):
            if not st.st_mode & stat.S_IROTH or st.st_size > HOST_ETC_MAX_FILE:
                return  # not public, or not a config file
            if total + st.st_size > HOST_ETC_MAX_TOTAL:
                return
            try:
                data = path.read_bytes()
            except OSError:
                return
            total += len(data)
            out[rel] = (rel, "f", 0o755 if st.st_mode & 0o111 else 0o644, data)
        elif stat.S_ISDIR(st.st_mode):
            if not st.st_mode & stat.S_IROTH or not st.st_mode & stat.S_IXOTH:
                return
            out[rel] = (rel, "d", 0o755, b"")
            try:
                names = sorted(os.listdir(path))
            except OSError:
                return
            for name in names:
                add(f"{rel}/{name}")

    for pattern in HOST_ETC:
        head, _, tail = pattern.rpartition("/")
        base = host_etc / head if head else host_etc
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            if fnmatch.fnmatchcase(name, tail):
                add(f"{head}/{name}" if head else name)
    for name in ETC_FILES:  # ours win over anything copied
        out.pop(name, None)
    return sorted(out.values())


def etc_entries(host_etc: Path = Path("/etc")) -> list[tuple[str, str, int, bytes]]:
    """Everything the built-in image's /etc holds: copied and generated."""
    entries = _host_etc_entries(host_etc)
    entries += [(name, "f", 0o644, content.encode()) for name, content in ETC_FILES.items()]
    return sorted(entries)


def write_etc(link: Path, host_etc: Path = Path("/etc")) -> Path:
    """Build the built-in image's /etc; return its directory.

    The directory is named after a hash of its content
    (`etc-<sha256[:16]>` next to `link`) and never changed once complete,
    so Managers sharing a bundle directory (and runs already using it) are
    never disturbed; `link` is a symlink to the current one. A host package
    update that changes an allowlisted file makes a new directory at the
    next Manager start.
    """
    entries = etc_entries(host_etc)
    digest = hashlib.sha256()
    for rel, kind, mode, data in entries:
        digest.update(b"%s\0%s\0%o\0%d\0" % (rel.encode("utf-8", "surrogateescape"), kind.encode(), mode, len(data)))
        digest.update(data)
    parent = link.parent
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"etc-{digest.hexdigest()[:16]}"
    if not (final / ".complete").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".etc-", dir=parent))
        try:
            os.chmod(tmp, 0o755)
            for rel, kind, mode, data in entries:
                path = tmp / rel
                if kind == "d":
                    path.mkdir(mode=0o755, exist_ok=True)
                elif kind == "l":
                    os.symlink(data.decode("utf-8", "surrogateescape"), path)
                else:
                    path.write_bytes(data)
                    os.chmod(path, mode)
            (tmp / ".complete").touch()
            try:
                os.rename(tmp, final)
            except OSError:  # another Manager made it first (same content)
                shutil.rmtree(tmp, ignore_errors=True)
                if not (final / ".complete").exists():
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not (link.is_symlink() and os.readlink(link) == final.name):
        if link.exists() and not link.is_symlink():
            # A plain directory from before /etc was content-addressed.
            aside = parent / f".etc-old-{secrets.token_hex(4)}"
            os.rename(link, aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp_link = parent / f".etc-link-{secrets.token_hex(4)}"
        os.symlink(final.name, tmp_link)
        os.replace(tmp_link, link)
    return final


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
    for d in ("proc", "dev", "sys", "etc", "tmp", "run", "var"):
        (root / d).mkdir(exist_ok=True)
    # /var/tmp: where programs put temporary files that outlive a reboot;
    # here it is in the run's memory like the rest of the root's writes.
    (root / "var" / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "var" / "tmp", 0o1777)
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


def _lookup(path: str, rootfs: str | None, binds: list[tuple[str, str]], tmpfs: list[str]) -> tuple[str, str]:
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
        return "host", os.path.join(source, path[len(best) :].lstrip("/"))
    if kind == "tmpfs":
        return ("dir", "") if path == best else ("missing", "")
    if rootfs is not None:
        return "host", os.path.join(rootfs, path.lstrip("/"))
    # Default image: its fixed directories and the parents of every mountpoint.
    made = {"/", "/proc", "/dev", "/sys", "/etc", "/tmp", "/run", "/var", "/var/tmp"}
    for dest in [d for d, _ in binds] + tmpfs:
        while dest not in ("/", ""):
            made.add(dest)
            dest = posixpath.dirname(dest)
    return ("dir", "") if path in made else ("missing", "")
