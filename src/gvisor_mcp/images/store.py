"""The image store: immutable, content-addressed root filesystems under the state directory.

    <state-dir>/images/
      .lock                    flock: exclusive while names or images change, shared to lease
      sha256/<hex>/rootfs/     one image, never changed once it is here
      sha256/<hex>/image.json  digest, size, source, created, packages, OCI config
      names/<name>             {"digest": "sha256:..."}: a name points at one image
      leases/<hex>/<pid>-<id>  flock'd by a process using the image (a run, a warm pool)
      tmp/<work>/              builds, pulls, imports and removals in progress

An image's digest is the sha256 of its unpacked tree (tree.tree_info), so
the same content always has the same digest, whichever way it came in.
Every change is made in tmp/ and published by one rename under the lock:
a failed build, pull or import leaves the store exactly as it was, and a
reader never sees half an image. A name can be pointed at a new image (a
rebuild); the old image stays, unnamed, until `image rm sha256:...` or
`image prune`, so a policy that pins a digest keeps working.

Why over ~400 lines: names, images, leases and removal share one lock
discipline (the flock on .lock) that is only checkable in one place.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from . import tree
from .errors import ImageError, ImageInUse, ImageNotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit (not 'host')"
DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
RESERVED = ("host",)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED:
        raise ImageError(f"image name {name!r} is not allowed; expected {NAME_EXPECTED}")
    return name


def parse_ref(ref: str) -> tuple[str | None, str | None]:
    """`NAME`, `NAME@sha256:HEX` or `sha256:HEX` -> (name, digest)."""
    name, sep, digest = ref.partition("@")
    if not sep and DIGEST_RE.match(ref):
        return None, ref
    if sep and not DIGEST_RE.match(digest):
        raise ImageError(f"{ref!r}: the digest must be sha256: followed by 64 lowercase hex digits")
    check_name(name)
    return name, digest or None


class StoredImage(BaseModel):
    """One image of the store (image.json), plus the names pointing at it."""

    model_config = ConfigDict(frozen=True)

    digest: str
    size: int
    entries: int
    created: str
    source: dict[str, Any]
    packages: list[str] | None = None
    config: dict[str, Any] | None = None
    notes: list[str] = []
    has_shell: bool = True
    names: tuple[str, ...] = ()
    path: str = ""
    """The image directory; the root filesystem is `rootfs` below it."""

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


@dataclass
class Work:
    """A directory under tmp/ for one build, pull or import (removed when done)."""

    path: Path
    rootfs: Path
    lock_fd: int
    notes: list[str] = field(default_factory=list)


class ImageStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._meta: dict[str, StoredImage] = {}  # image.json is immutable: cache by digest
        self._holds: dict[str, _Hold] = {}

    # --- layout -------------------------------------------------------------

    def _dirs(self) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.root, self.root / "sha256", self.root / "names", self.root / "leases", self.root / "tmp"):
            d.mkdir(mode=0o700, exist_ok=True)

    def image_dir(self, digest: str) -> Path:
        m = DIGEST_RE.match(digest)
        if not m:
            raise ImageError(f"{digest!r} is not a sha256 digest")
        return self.root / "sha256" / m.group(1)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self._dirs()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # --- reading ------------------------------------------------------------

    def names(self) -> dict[str, str]:
        """name -> digest."""
        out = {}
        try:
            entries = sorted(os.listdir(self.root / "names"))
        except FileNotFoundError:
            return {}
        for name in entries:
            if not NAME_RE.match(name):
                continue
            try:
                data = json.loads((self.root / "names" / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and DIGEST_RE.match(str(data.get("digest"))):
                out[name] = data["digest"]
        return out

    def _load(self, digest: str) -> StoredImage | None:
        cached = self._meta.get(digest)
        if cached is not None and os.path.isdir(cached.path):
            return cached
        d = self.image_dir(digest)
        try:
            data = json.loads((d / "image.json").read_text())
        except (OSError, ValueError):
            return None
        image = StoredImage.model_validate({**data, "path": str(d), "names": ()})
        self._meta[digest] = image
        return image

    def get(self, ref: str) -> StoredImage:
        """The image `ref` names (NAME, NAME@sha256:..., sha256:...); ImageNotFound if none."""
        name, digest = parse_ref(ref)
        names = self.names()
        if name is not None and digest is None:
            digest = names.get(name)
            if digest is None:
                raise ImageNotFound(self.missing_text(ref))
        assert digest is not None
        image = self._load(digest)
        if image is None:
            raise ImageNotFound(self.missing_text(ref))
        return image.model_copy(update={"names": tuple(n for n, d in names.items() if d == digest)})

    def missing_text(self, ref: str) -> str:
        name, digest = parse_ref(ref)
        where = f"the image store at {self.root}"
        if digest is not None:
            current = self.names().get(name) if name else None
            now = f" (the name {name!r} now points at {current})" if current else ""
            return (
                f"image {ref!r} is not in {where}{now}: import, pull or build that exact image again, "
                f"or change the pinned digest"
            )
        return (
            f"image {name!r} is not in {where}: build it (`gvisor-mcp image build {name} --packages "
            f"p1,p2,...` or `--recipe FILE`), pull it (`gvisor-mcp image pull REF --name {name}`) or "
            f"import it (`gvisor-mcp image import FILE --name {name}`), with --state-dir "
            f"{self.root.parent}"
        )

    def list(self) -> list[StoredImage]:
        """Every image, named ones first (by name), then unnamed ones (by digest)."""
        names = self.names()
        out: list[StoredImage] = []
        try:
            hexes = sorted(os.listdir(self.root / "sha256"))
        except FileNotFoundError:
            return []
        for hexd in hexes:
            digest = f"sha256:{hexd}"
            if not DIGEST_RE.match(digest):
                continue
            image = self._load(digest)
            if image is not None:
                out.append(image.model_copy(update={"names": tuple(n for n, d in names.items() if d == digest)}))
        out.sort(key=lambda i: (not i.names, i.names[:1], i.digest))
        return out

    # --- adding -------------------------------------------------------------

    @contextlib.contextmanager
    def work(self) -> Iterator[Work]:
        """A fresh work directory, removed afterwards whatever happens."""
        with self._locked(exclusive=False):
            self._sweep_tmp()
            path = self.root / "tmp" / f"w-{secrets.token_hex(8)}"
            path.mkdir(mode=0o700)
        lock_fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        rootfs = path / "image" / "rootfs"
        rootfs.mkdir(parents=True, mode=0o755)
        try:
            yield Work(path=path, rootfs=rootfs, lock_fd=lock_fd)
        finally:
            try:
                safe_rmtree(path)
            finally:
                os.close(lock_fd)

    def _sweep_tmp(self) -> None:
        """Remove what dead processes left in tmp/ (their work lock is free)."""
        for entry in os.listdir(self.root / "tmp"):
            path = self.root / "tmp" / entry
            try:
                fd = os.open(path / ".lock", os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            except OSError:
                continue
            try:
                if fd >= 0:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # in progress in another process
                elif time.time() - path.lstat().st_mtime < 60:
                    continue  # just made, not locked yet
                safe_rmtree(path)
            except OSError:
                pass
            finally:
                if fd >= 0:
                    os.close(fd)

    def add(self, work: Work, name: str, source: dict[str, Any], config: dict[str, Any] | None = None) -> StoredImage:
        """Finish an unpacked tree in `work` and publish it under `name`."""
        check_name(name)
        root_fd = os.open(work.rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            changes = tree.finalize(root_fd)
            info = tree.tree_info(root_fd)
            packages = tree.installed_packages(root_fd)
            shell = tree.has_shell(root_fd)
        finally:
            os.close(root_fd)
        notes = list(work.notes)
        if not shell:
            notes.append("no /bin/sh: the server runs every command as /bin/sh -c, so commands cannot run in it")
        meta = {
            "digest": info.digest,
            "size": info.size,
            "entries": info.entries,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": source,
            "packages": packages,
            "config": config,
            "notes": notes + changes,
            "has_shell": shell,
        }
        staged = work.path / "image"
        (staged / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(staged, 0o755)
        final = self.image_dir(info.digest)
        with self._locked(exclusive=True):
            if not (final / "image.json").exists():
                if final.exists():  # an earlier attempt died between rename and image.json: impossible, but be sure
                    _discard(self.root, final)
                os.rename(staged, final)
            self._write_name(name, info.digest)
        return self.get(name)

    def _write_name(self, name: str, digest: str) -> None:
        tmp = self.root / "names" / f".{name}.{secrets.token_hex(4)}"
        tmp.write_text(json.dumps({"digest": digest}) + "\n")
        os.replace(tmp, self.root / "names" / name)

    def tag(self, ref: str, name: str) -> StoredImage:
        """Point `name` at the image `ref` names."""
        check_name(name)
        with self._locked(exclusive=True):
            image = self.get(ref)
            self._write_name(name, image.digest)
        return self.get(name)

    # --- removing -----------------------------------------------------------

    def remove(self, ref: str) -> tuple[StoredImage, bool]:
        """Remove a name (and its image when no other name points at it), or an
        unnamed image by digest. Refused (ImageInUse) while something uses the
        image. Returns the image and whether its files were deleted."""
        name, digest = parse_ref(ref)
        if name is not None and digest is not None:
            raise ImageError(f"{ref!r}: remove a name (NAME) or an image (sha256:...), not both")
        with self._locked(exclusive=True):
            image = self.get(ref)
            users = self._users(image.digest)
            if users:
                raise ImageInUse(ref, users)
            if name is None and image.names:
                raise ImageError(
                    f"image {ref} is named {', '.join(image.names)}; remove those names "
                    f"(`gvisor-mcp image rm NAME`) instead"
                )
            if name is not None:
                os.unlink(self.root / "names" / name)
            others = [n for n in image.names if n != name]
            if others:
                return image, False
            aside = _discard(self.root, Path(image.path))
            self._meta.pop(image.digest, None)
        safe_rmtree(aside)
        return image, True

    def prune(self) -> builtins.list[StoredImage]:  # builtins: `list` here is the method above
        """Remove every image no name points at and nothing uses."""
        removed: builtins.list[StoredImage] = []
        aside: builtins.list[Path] = []
        with self._locked(exclusive=True):
            for image in self.list():
                if image.names or self._users(image.digest):
                    continue
                aside.append(_discard(self.root, Path(image.path)))
                self._meta.pop(image.digest, None)
                removed.append(image)
        for path in aside:
            safe_rmtree(path)
        return removed

    # --- leases ---------------------------------------------------------------

    def hold(self, digest: str, what: str) -> Holding:
        """Mark the image as used by this process for `what` until release():
        `image rm` refuses it meanwhile and says who uses it. Raises
        ImageNotFound when the image is gone (removed since it was looked up)."""
        hexd = self.image_dir(digest).name
        hold = self._holds.get(hexd)
        if hold is None:
            with self._locked(exclusive=False):
                if not (self.image_dir(digest) / "image.json").exists():
                    raise ImageNotFound(f"image {digest} was removed from the image store just now; ask again")
                d = self.root / "leases" / hexd
                d.mkdir(mode=0o700, exist_ok=True)
                path = d / f"{os.getpid()}-{secrets.token_hex(4)}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
            hold = self._holds[hexd] = _Hold(fd=fd, path=path)
        holding = Holding(self, hexd, what)
        hold.users[id(holding)] = what
        hold.write()
        return holding

    def _release(self, hexd: str, holding: Holding) -> None:
        hold = self._holds.get(hexd)
        if hold is None or hold.users.pop(id(holding), None) is None:
            return
        if hold.users:
            hold.write()
            return
        del self._holds[hexd]
        try:
            os.unlink(hold.path)
        except FileNotFoundError:
            pass
        os.close(hold.fd)

    def users(self, ref: str) -> builtins.list[str]:
        with self._locked(exclusive=True):
            return self._users(self.get(ref).digest)

    def _users(self, digest: str) -> builtins.list[str]:
        """What live processes use the image for (stale lease files are removed)."""
        d = self.root / "leases" / self.image_dir(digest).name
        out: builtins.list[str] = []
        try:
            entries = sorted(os.listdir(d))
        except FileNotFoundError:
            return out
        for entry in entries:
            path = d / entry
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    text = os.pread(fd, 64 * 1024, 0).decode("utf-8", "replace").strip()
                    out.extend(line for line in text.splitlines() if line)
                    continue
                os.unlink(path)  # its process is gone
            finally:
                os.close(fd)
        return out


@dataclass
class _Hold:
    fd: int
    path: Path
    users: dict[int, str] = field(default_factory=dict)

    def write(self) -> None:
        lines = sorted(set(self.users.values()))
        data = ("\n".join(lines[:200]) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


class Holding:
    """One use of an image by this process; release() when done (idempotent)."""

    def __init__(self, store: ImageStore, hexd: str, what: str) -> None:
        self._store = store
        self._hexd = hexd
        self.what = what

    def release(self) -> None:
        self._store._release(self._hexd, self)

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _discard(root: Path, path: Path) -> Path:
    """Move an image directory into tmp/ (one rename: it is gone from the store at once)."""
    aside = root / "tmp" / f"rm-{path.name}-{secrets.token_hex(4)}"
    os.rename(path, aside)
    return aside


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    out: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            mp = fields[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def safe_rmtree(path: Path) -> None:
    """rmtree that refuses to descend into a mount (a leaked bind of /dev or
    /proc below a build directory must never be emptied)."""
    if not os.path.lexists(path):
        return
    mounted = mounts_below(path)
    if mounted:
        raise ImageError(
            f"not removing {path}: something is mounted below it ({', '.join(mounted[:3])}); "
            "unmount it, then remove the directory"
        )
    shutil.rmtree(path, ignore_errors=True)
