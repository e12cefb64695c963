"""Who owns what on a shared host: an flock held for a process's lifetime.

A lock file per owner instance; the kernel releases the lock when the owner
dies, however it dies (SIGKILL included), so "is the owner alive" is a
non-blocking lock attempt, with no pid reuse races. Container ids embed
their owner's instance, so a leftover names the process that made it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

ID_PREFIX = "gm-"


def new_container_id(instance: str) -> str:
    """A fresh container id owned by `instance` (instance_of reads it back)."""
    return f"{ID_PREFIX}{instance}-{secrets.token_hex(6)}"


def ids_of(instance: str) -> str:
    """A glob matching every container id `instance` makes."""
    return f"{ID_PREFIX}{instance}-*"


def instance_of(container_id: str) -> str | None:
    """The owner instance a container id names; None for ids not ours."""
    if not container_id.startswith(ID_PREFIX):
        return None
    inst, sep, _ = container_id[len(ID_PREFIX) :].partition("-")
    return inst if sep and len(inst) == 8 else None


class OwnerLock:
    def __init__(self, directory: Path, instance: str | None = None) -> None:
        self.directory = directory
        self.instance = instance or secrets.token_hex(4)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / f"{self.instance}.lock"
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def alive(self, instance: str) -> bool:
        """Whether `instance`'s owner still runs (ours is, until release())."""
        if instance == self.instance:
            return self._fd is not None
        try:
            fd = os.open(self.directory / f"{instance}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def forget_dead(self) -> list[str]:
        """Remove lock files of dead owners; return their instance ids."""
        dead = []
        for lock in self.directory.glob("*.lock"):
            if not self.alive(lock.stem):
                lock.unlink(missing_ok=True)
                dead.append(lock.stem)
        return dead

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
