"""Safe file operations on a directory a sandbox can write to.

The server reads and writes workspace (and project) files itself, without
booting a sandbox, so everything here assumes the tree is hostile: an
earlier command may have planted symlinks (to `/etc`, to the workspace's own
image file, to `/proc/self/root`), FIFOs, sockets, or may swap a directory
for a symlink while we walk. The rules:

- Every path is resolved from an fd of the root with openat2(2)
  `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: the
  kernel refuses to leave the root or to follow any symlink, atomically.
  Where openat2 is missing (kernels before 5.6) the same is done by
  walking one component at a time with `O_NOFOLLOW` from the root's fd.
  `..` never reaches the kernel: it is refused when the path is parsed.
- Only regular files are read or written. Files are opened `O_NONBLOCK`
  and checked with fstat before any read, so a FIFO, socket or device is
  an error at once and never blocks the server.
- Writes are atomic: a temporary name in the same directory, then
  rename(2) over the target. A failure (full workspace, bad data) removes
  the temporary file and any parent directory this call created: the
  tree is left as it was, never with a partial file.
- New files and directories are owned by the sandbox user (uid, gid given
  by the caller), so the next command can change them; an existing file
  keeps its owner and mode unless a mode is given.

No MCP and no policy here: tools/files.py maps paths and limits onto this.

Why over ~400 lines: every operation here relies on the same openat2
resolution and its fallback; kept together so the safety rules above are
checked against all of them at once.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import Refusal

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
SYS_OPENAT2 = 437
"""The same number on every architecture that has it (x86_64, aarch64, ...)."""
MAX_PATH_BYTES = 4096
TEMP_PREFIX = ".gvisor-mcp-"
TEMP_SUFFIX = ".tmp"
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "char-device",
    stat.S_IFBLK: "block-device",
}


class FileError(Refusal):
    """A file operation refused or failed; `kind` for callers, the text for the agent.

    kinds: invalid, not_found, symlink, not_regular, is_directory,
    not_directory, not_empty, exists, read_only, no_space, too_large, io.

    The file tools answer these themselves (tools/files.py adds which root
    the path was in); a missing file is an answer, not a policy denial.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def kind_of(mode: int) -> str:
    return KINDS.get(stat.S_IFMT(mode), "other")


# --- paths -----------------------------------------------------------------------


def parse(path: str) -> tuple[str, ...]:
    """A relative path as its components; `.` and empty parts dropped.

    `..` is refused outright (never resolved, not even when it would stay
    inside): the kernel's RESOLVE_BENEATH would refuse escapes too, but a
    clear message beats EXDEV.
    """
    if "\x00" in path:
        raise FileError("invalid", "the path contains a NUL character")
    if path.startswith("/"):
        raise FileError("invalid", f"{_show(path)} is absolute here; expected a path relative to the root")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise FileError("invalid", "the path is not valid UTF-8") from None
    if size > MAX_PATH_BYTES:
        raise FileError("invalid", f"the path is {size} bytes long; at most {MAX_PATH_BYTES}")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise FileError("invalid", f"{_show(path)} contains '..'; expected a path without '..' components")
    return parts


def _show(path: str) -> str:
    text = repr(path)
    return text if len(text) <= 200 else text[:197] + "..."


def display(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


# --- openat2, or an O_NOFOLLOW walk ----------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None
_openat2_works: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, RESOLVE)
    fd = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(path.encode("utf-8")),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def openat2_available() -> bool:
    """Whether this kernel has openat2 (5.6+); checked once."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(os.open("/", os.O_PATH | os.O_CLOEXEC), ".", os.O_PATH))
            _openat2_works = True
        except OSError as e:
            _openat2_works = e.errno not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works


def _walk_open(rootfd: int, parts: tuple[str, ...], flags: int, mode: int) -> int:
    """The fallback: one component at a time, never following a symlink."""
    fd = os.dup(rootfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            kind = stat.S_IFMT(os.fstat(nxt).st_mode)
            if kind != stat.S_IFDIR:
                os.close(nxt)
                code = errno.ELOOP if kind == stat.S_IFLNK else errno.ENOTDIR
                raise OSError(code, os.strerror(code), part)
            os.close(fd)
            fd = nxt
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=fd)
        try:
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        except NotADirectoryError:  # O_DIRECTORY on a symlink says ENOTDIR; openat2 says ELOOP
            if stat.S_ISLNK(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), parts[-1]) from None
            raise
    finally:
        os.close(fd)


def open_beneath(rootfd: int, parts: tuple[str, ...], flags: int, mode: int = 0) -> int:
    """open(2) `parts` beneath `rootfd`, following no symlink and never leaving it."""
    if openat2_available():
        return _openat2(rootfd, display(parts), flags, mode)
    return _walk_open(rootfd, parts, flags, mode)


def open_root(path: str) -> int:
    """An O_PATH fd of the root directory (the server's own path: its last
    component must not be a symlink either)."""
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise FileError("not_found", f"the directory is not available ({os.strerror(e.errno or 0)})") from None


@contextmanager
def root(path: str) -> Iterator[int]:
    fd = open_root(path)
    try:
        yield fd
    finally:
        os.close(fd)


def _explain(e: OSError, parts: tuple[str, ...], doing: str) -> FileError:
    """An OSError as text the agent can act on."""
    shown = display(parts)
    code = e.errno
    if code == errno.ENOENT:
        return FileError("not_found", f"{shown} does not exist")
    if code in (errno.ELOOP, errno.EXDEV):
        return FileError(
            "symlink",
            f"{shown} is or goes through a symbolic link; the file tools never follow links "
            "(a command may have planted it). Use the real path, or run a command to read it",
        )
    if code == errno.ENOTDIR:
        return FileError("not_directory", f"a component of {shown} is not a directory")
    if code == errno.EISDIR:
        return FileError("is_directory", f"{shown} is a directory; list it with list_files")
    if code in (errno.ENXIO, errno.EACCES, errno.EPERM, errno.ENODEV):
        return FileError("not_regular", f"{shown} cannot be {doing}: {os.strerror(code)}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return FileError("no_space", f"no space left while {doing} {shown}")
    if code == errno.EROFS:
        return FileError("read_only", f"{shown} is on a read-only filesystem")
    if code == errno.ENAMETOOLONG:
        return FileError("invalid", f"a name in {shown} is too long (at most 255 bytes each)")
    if code == errno.ENOTEMPTY:
        return FileError(
            "not_empty", f"{shown} is a directory that is not empty; pass recursive=true to delete it with its contents"
        )
    if code == errno.EEXIST:
        return FileError("exists", f"{shown} already exists")
    return FileError("io", f"{doing} {shown} failed: {os.strerror(code or 0)}")


def _require_regular(
    st: os.stat_result,
    parts: tuple[str, ...],
    *,
    directory: str = "list it with list_files",
    other: str = "only regular files are read or written by the file tools",
) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise FileError("is_directory", f"{display(parts)} is a directory; {directory}")
    if not stat.S_ISREG(st.st_mode):
        raise FileError("not_regular", f"{display(parts)} is a {kind_of(st.st_mode)}, not a regular file; {other}")


# --- read ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadResult:
    data: bytes
    size: int
    """The file's size when read."""
    mtime: float


def read(rootfd: int, parts: tuple[str, ...], offset: int, length: int) -> ReadResult:
    """Bytes [offset, offset+length) of a regular file beneath the root."""
    if not parts:
        raise FileError("is_directory", ". is a directory; list it with list_files")
    try:
        fd = open_beneath(rootfd, parts, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EACCES, errno.EPERM, errno.ENODEV):
            # A socket (ENXIO), or a device on a nodev mount: say what it is.
            _require_regular(stat_beneath(rootfd, parts), parts)
        raise _explain(e, parts, "read") from None
    try:
        st = os.fstat(fd)
        _require_regular(st, parts)
        data = os.pread(fd, length, offset) if offset < st.st_size else b""
        return ReadResult(data, st.st_size, st.st_mtime)
    except OSError as e:
        raise _explain(e, parts, "read") from None
    finally:
        os.close(fd)


def stat_beneath(rootfd: int, parts: tuple[str, ...]) -> os.stat_result:
    """lstat-like: the entry itself (a symlink is reported, not followed)."""
    try:
        if not parts:
            return os.fstat(rootfd)
        parent = open_beneath(rootfd, parts[:-1], os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise _explain(e, parts, "stat") from None
    try:
        return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except OSError as e:
        raise _explain(e, parts, "stat") from None
    finally:
        os.close(parent)


# --- write ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    size: int
    created: bool
    mode: int


def _parent(rootfd: int, parts: tuple[str, ...], uid: int, gid: int, made: list[tuple[int, str]]) -> int:
    """An fd of the directory holding `parts[-1]`, creating missing directories
    (owned uid:gid, recorded in `made` as (parent fd, name) for undoing)."""
    fd = os.dup(rootfd)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = open_beneath(fd, (part,), os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                try:
                    os.mkdir(part, DEFAULT_DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    pass  # a command made it meanwhile: opened below, if it is a directory
                else:
                    os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
                    made.append((os.dup(fd), part))
                nxt = open_beneath(fd, (part,), os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise _explain(e, parts[: i + 1], "open") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def write(
    rootfd: int, parts: tuple[str, ...], data: bytes, *, uid: int, gid: int, mode: int | None = None
) -> WriteResult:
    """Replace (or create) a regular file atomically: temp name, then rename.

    Refuses when the target is a directory, a symlink or any other
    non-regular file. Missing parent directories are created. On any
    failure nothing is left: no temp file, no directory this call made.
    """
    if not parts:
        raise FileError("is_directory", "the root itself is a directory; give a file name")
    made: list[tuple[int, str]] = []
    tmp = TEMP_PREFIX + secrets.token_hex(8) + TEMP_SUFFIX
    parent = -1
    tmp_made = False
    try:
        try:
            parent = _parent(rootfd, parts, uid, gid, made)
        except OSError as e:
            raise _explain(e, parts, "write") from None
        name = parts[-1]
        try:
            old: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        except OSError as e:
            raise _explain(e, parts, "write") from None
        if old is not None:
            if stat.S_ISLNK(old.st_mode):
                raise FileError(
                    "symlink",
                    f"{display(parts)} is a symbolic link; the file tools never follow links. "
                    "Write to the path it points to, or delete the link first",
                )
            _require_regular(
                old, parts, directory="give a file name", other="delete it first to replace it with a file"
            )
        perm = mode if mode is not None else (stat.S_IMODE(old.st_mode) & 0o777 if old else DEFAULT_FILE_MODE)
        owner = (old.st_uid, old.st_gid) if old is not None else (uid, gid)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            tmp_made = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchown(fd, *owner)
                os.fchmod(fd, perm)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            tmp_made = False
        except OSError as e:
            raise _explain(e, parts, "writing") from None
        for fd_, _ in made:
            os.close(fd_)
        made.clear()
        return WriteResult(len(data), old is None, perm)
    finally:
        if tmp_made:
            _quiet(lambda: os.unlink(tmp, dir_fd=parent))
        for fd_, part in reversed(made):  # undo the directories this call created
            _quiet(functools.partial(os.rmdir, part, dir_fd=fd_))
            os.close(fd_)
        if parent >= 0:
            os.close(parent)


def _quiet(fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError:
        pass


def parse_mode(text: str | None) -> int | None:
    """ "644", "0755" -> permission bits; setuid/setgid/sticky are not offered."""
    if text is None:
        return None
    s = text.strip()
    if s.startswith("0o"):
        s = s[2:]
    if not (3 <= len(s) <= 4) or any(c not in "01234567" for c in s) or (len(s) == 4 and s[0] != "0"):
        raise FileError("invalid", f'mode {text!r} is not a permission mode; expected octal like "644" or "0755"')
    return int(s, 8)


# --- list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]
    kind: str
    size: int
    mtime: float
    mode: int
    target: str | None = None
    """A symlink's target text (never followed)."""


def listing(rootfd: int, parts: tuple[str, ...], depth: int, limit: int) -> tuple[list[Entry], bool]:
    """Entries beneath `parts`, `depth` levels deep, sorted, at most `limit`.

    Returns (entries, truncated). Symlinks are listed, never followed;
    directories are descended through fds opened without following links.
    """
    try:
        fd = open_beneath(rootfd, parts, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise _explain(e, parts, "list") from None
    out: list[Entry] = []
    try:
        truncated = _list_dir(fd, parts, depth, limit, out)
    finally:
        os.close(fd)
    return out, truncated


def _list_dir(fd: int, base: tuple[str, ...], depth: int, limit: int, out: list[Entry]) -> bool:
    try:
        names = sorted(os.listdir(fd))
    except OSError:
        return False
    for name in names:
        if len(out) >= limit:
            return True
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        target = None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=fd)
            except OSError:
                target = None
        path = (*base, name)
        out.append(Entry(path, kind_of(st.st_mode), st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode), target))
        if depth > 1 and stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue
            try:
                if _list_dir(sub, path, depth - 1, limit, out):
                    return True
            finally:
                os.close(sub)
    return False


# --- delete --------------------------------------------------------------------------


def delete(rootfd: int, parts: tuple[str, ...], *, recursive: bool) -> str:
    """Remove an entry beneath the root (a symlink itself, never its target).

    Returns the kind removed. A directory needs `recursive` unless empty;
    recursive removal goes through fds (shutil.rmtree with dir_fd is safe
    against symlink swaps on Linux).
    """
    if not parts:
        raise FileError("invalid", "the root itself cannot be deleted; delete the entries in it")
    try:
        parent = open_beneath(rootfd, parts[:-1], os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise _explain(e, parts, "delete") from None
    name = parts[-1]
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        kind = kind_of(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
                try:
                    shutil.rmtree(name, dir_fd=rfd)
                finally:
                    os.close(rfd)
            else:
                os.rmdir(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return kind
    except OSError as e:
        raise _explain(e, parts, "delete") from None
    finally:
        os.close(parent)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


__all__ = [
    "Entry",
    "FileError",
    "ReadResult",
    "WriteResult",
    "delete",
    "display",
    "kind_of",
    "listing",
    "open_beneath",
    "open_root",
    "openat2_available",
    "parse",
    "parse_mode",
    "read",
    "root",
    "stat_beneath",
    "write",
]
