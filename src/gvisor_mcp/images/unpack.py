"""Apply image layers (tar streams) to a directory, assuming every archive is hostile.

Nothing lands outside the target directory: every path is opened one
component at a time from a directory fd, never following a symlink
(O_NOFOLLOW), so an entry that would go through a link — planted by an
earlier entry or layer, or anywhere — is an error, not a write somewhere
else. Rules, each ending in an `UnpackError` that names the entry:

- absolute names, `..` components, NUL bytes and over-long names;
- entries whose parent is a symlink or not a directory;
- hardlinks whose target is absolute, has `..`, goes through a link, or is
  not a regular file already unpacked;
- whiteouts (`.wh.NAME`) naming `.`, `..` or something the same layer
  created; an opaque marker (`.wh..wh..opq`) clears only what lower layers
  left in its directory;
- more bytes or entries than the limits allow (a decompression bomb stops
  at the limit, not at the disk).

Dropped, with a note (the image still unpacks): device nodes and FIFOs,
setuid/setgid bits, every extended attribute (so file capabilities too),
and aufs metadata (`.wh..wh.*`). Symlinks are created as they are: inside
the sandbox they resolve against the image's own root, and this module
never follows one.

Directory modes are applied, and files keep their owners (numeric ids),
so an image looks inside as it was built.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from .errors import ImageError

DEFAULT_MAX_BYTES = 8 * 1024**3
"""Default limit on an image's unpacked file bytes (and on the archives read)."""
DEFAULT_MAX_ENTRIES = 1_000_000
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_LINK_BYTES = 4096
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1024 * 1024
MAX_NOTES = 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackError(ImageError):
    """An archive (or one of its entries) that is refused; the store is unchanged."""

    def __init__(self, entry: str | None, problem: str, layer: str | None = None) -> None:
        self.entry = entry
        self.problem = problem
        self.layer = layer
        where = f" in {layer}" if layer else ""
        if entry is None:
            super().__init__(f"{problem}{where}")
        else:
            super().__init__(f"entry {entry!r}{where}: {problem}")


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_entries: int = DEFAULT_MAX_ENTRIES


@dataclass
class UnpackStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.dropped += 1
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)


Parts = tuple[str, ...]


def clean_name(name: str) -> Parts:
    """An archive member name as path components below the root, or UnpackError."""
    if "\x00" in name:
        raise UnpackError(name, "the name contains a NUL byte")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnpackError(name[:80] + "...", f"the name is longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise UnpackError(name, "absolute paths are not allowed in an image layer")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnpackError(name, "'..' components are not allowed in an image layer")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise UnpackError(name, f"a path component is longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


class Unpacker:
    """Applies layers, lowest first, to one directory (normally empty at the start)."""

    def __init__(self, root: str | os.PathLike[str], limits: UnpackLimits | None = None) -> None:
        self.limits = limits or UnpackLimits()
        self.stats = UnpackStats()
        self._root = os.open(root, _DIR_FLAGS)
        self._layer: set[Parts] = set()
        self._layer_name: str | None = None

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def __enter__(self) -> Unpacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- layers -----------------------------------------------------------

    def apply(self, stream: IO[bytes], layer: str = "layer") -> None:
        """Apply one layer: a tar stream, uncompressed or gzip/bzip2/xz."""
        self._layer = set()
        self._layer_name = layer
        try:
            with tarfile.open(fileobj=stream, mode="r|*", errorlevel=2) as tar:
                for member in _members(tar, layer):
                    self._entry(tar, member)
        except UnpackError as e:
            if e.layer is None:
                e.layer = layer
                e.args = (str(UnpackError(e.entry, e.problem, layer)),)
            raise
        except tarfile.CompressionError as e:
            raise UnpackError(
                None, f"unsupported compression ({e}); layers must be tar, gzip, bzip2 or xz", layer
            ) from None
        except (tarfile.TarError, EOFError, ValueError) as e:
            raise UnpackError(None, f"not a valid tar archive ({e})", layer) from None

    # --- one entry --------------------------------------------------------

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = clean_name(m.name)
        self.stats.entries += 1
        if self.stats.entries > self.limits.max_entries:
            raise UnpackError(m.name, f"the image has more than {self.limits.max_entries:,} entries")
        if not parts:  # the root itself ("./"): its attributes are ours
            if not m.isdir():
                raise UnpackError(m.name, "the image root must be a directory")
            return
        name = parts[-1]
        if name.startswith(WHITEOUT):
            self._whiteout(m.name, parts)
            return
        if m.isdev() or m.isfifo():
            kind = "FIFO" if m.isfifo() else "device node"
            self.stats.note(f"dropped {kind} {m.name}")
            return
        if m.isreg():
            if self.stats.bytes + m.size > self.limits.max_bytes:
                raise UnpackError(
                    m.name, f"the image is larger than the limit of {human_size(self.limits.max_bytes)} unpacked"
                )
        elif not (m.isdir() or m.issym() or m.islnk()):
            self.stats.note(f"dropped {m.name} (unsupported type {m.type!r})")
            return
        if m.mode & (stat.S_ISUID | stat.S_ISGID) and not m.isdir():
            self.stats.note(f"removed setuid/setgid from {m.name}")
        if m.pax_headers and any(k == "SCHILY.xattr.security.capability" for k in m.pax_headers):
            self.stats.note(f"dropped file capabilities of {m.name}")

        parent = self._dir(parts[:-1], m.name, create=True)
        try:
            if m.isdir():
                self._mkdir(parent, name, m)
            elif m.isreg():
                self._file(parent, name, m, tar)
            elif m.issym():
                self._symlink(parent, name, m)
            else:
                self._hardlink(parent, name, m)
        finally:
            os.close(parent)
        self._created(parts)

    def _mkdir(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        st = _lstat(name, parent)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            _remove(parent, name, st)
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            os.fchown(fd, *self._owner(m))
            os.fchmod(fd, m.mode & 0o1777)
        finally:
            os.close(fd)

    def _file(self, parent: int, name: str, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        st = _lstat(name, parent)
        if st is not None:
            _remove(parent, name, st)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            src = tar.extractfile(m)
            written = 0
            if src is not None:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > m.size:  # never trust a stream beyond its header
                        raise UnpackError(m.name, "more data than the entry's declared size")
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            os.fchown(fd, *self._owner(m))
            os.fchmod(fd, m.mode & 0o777)
            try:
                os.utime(fd, (m.mtime, m.mtime))
            except (OverflowError, OSError, ValueError):
                pass  # an absurd timestamp is not worth refusing the image for
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes += m.size

    def _symlink(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        target = m.linkname
        if not target or "\x00" in target or len(target.encode("utf-8", "surrogateescape")) > MAX_LINK_BYTES:
            raise UnpackError(m.name, "the symlink target is empty, too long or contains NUL")
        st = _lstat(name, parent)
        if st is not None:
            _remove(parent, name, st)
        os.symlink(target, name, dir_fd=parent)
        os.chown(name, *self._owner(m), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, parent: int, name: str, m: tarfile.TarInfo) -> None:
        try:
            tparts = clean_name(m.linkname)
        except UnpackError as e:
            raise UnpackError(m.name, f"hardlink target {m.linkname!r}: {e.problem}") from None
        if not tparts:
            raise UnpackError(m.name, "a hardlink to the image root")
        tparent = self._dir(tparts[:-1], m.name, create=False)
        if tparent < 0:
            raise UnpackError(m.name, f"hardlink target {m.linkname!r} does not exist in the image")
        try:
            tst = _lstat(tparts[-1], tparent)
            if tst is None or not stat.S_ISREG(tst.st_mode):
                raise UnpackError(m.name, f"hardlink target {m.linkname!r} is not a regular file of the image")
            st = _lstat(name, parent)
            if st is not None:
                if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                    return  # already that file
                _remove(parent, name, st)
            os.link(tparts[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(tparent)

    def _whiteout(self, entry: str, parts: Parts) -> None:
        name = parts[-1]
        if name == OPAQUE:
            d = self._dir(parts[:-1], entry, create=False)
            if d < 0:
                return
            try:
                for child in os.listdir(d):
                    if (*parts[:-1], child) not in self._layer:
                        _remove(d, child, _lstat(child, d))
            finally:
                os.close(d)
            self._created(parts[:-1])
            return
        if name.startswith(WHITEOUT + WHITEOUT):
            self.stats.note(f"ignored aufs metadata {entry}")
            return
        victim = name[len(WHITEOUT) :]
        if victim in ("", ".", ".."):
            raise UnpackError(entry, f"a whiteout must name a file, not {victim!r}")
        if (*parts[:-1], victim) in self._layer:
            raise UnpackError(entry, f"whites out {victim!r}, which the same layer created before it")
        d = self._dir(parts[:-1], entry, create=False)
        if d < 0:
            return
        try:
            st = _lstat(victim, d)
            if st is not None:
                _remove(d, victim, st)
        finally:
            os.close(d)

    # --- paths ------------------------------------------------------------

    def _dir(self, parts: Parts, entry: str, *, create: bool) -> int:
        """An fd of the directory `parts` below the root, never through a link.

        Missing directories are made (0755, root-owned: like tar's implicit
        parents) when `create`, else -1 is returned.
        """
        fd = os.dup(self._root)
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return -1
                    os.mkdir(p, 0o755, dir_fd=fd)
                    self._created(parts[: i + 1])
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise UnpackError(
                            entry,
                            f"{where!r} is a symlink or not a directory; an entry may not go "
                            "through a link (nothing is ever written outside the image)",
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        return fd

    def _owner(self, m: tarfile.TarInfo) -> tuple[int, int]:
        ids = []
        for value in (m.uid, m.gid):
            if not isinstance(value, int) or not 0 <= value < 2**31 - 1:
                self.stats.note(f"owner {m.uid}:{m.gid} of {m.name} replaced by 0:0")
                return 0, 0
            ids.append(value)
        return ids[0], ids[1]

    def _created(self, parts: Parts) -> None:
        for i in range(1, len(parts) + 1):
            self._layer.add(parts[:i])


def _members(tar: tarfile.TarFile, layer: str) -> Iterator[tarfile.TarInfo]:
    while True:
        try:
            m = tar.next()
        except tarfile.ReadError as e:
            raise UnpackError(None, f"not a valid tar archive ({e})", layer) from None
        if m is None:
            return
        yield m


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: str, st: os.stat_result | None) -> None:
    """Remove `name` in `dir_fd`; a directory with everything below it (fd-based, no link followed)."""
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def human_size(n: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.4g} {unit}"
    return f"{n} bytes"
