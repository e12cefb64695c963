"""Thawing a dead server's frozen pooled sandboxes, so they end by themselves.

A pooled sandbox's stub exits when its server's end of its stdin closes
(stub.py): a SIGKILLed server leaves nothing running. A frozen one (pool.py)
cannot read that EOF, and on cgroup v1 does not even die of SIGKILL until
thawed, so it would wait, holding its memory, for the next start's reaper or
`gvisor-mcp cleanup`.

The guard is one `/bin/sh` per Manager, started with its first pooled
sandbox (before any freeze), in a session of its own (a Ctrl-C aimed at
the server is not aimed at it), blocked reading a pipe only the server
holds. However the server ends, the read returns, and the guard thaws
every leaf of the Manager's instance (container ids embed it:
ownership.py); their stubs then read EOF and exit as unfrozen ones do. A Manager that closes normally thaws and stops its
sandboxes itself first, then closes the pipe: the guard finds nothing left
and exits. The leaves and bundle directories stay for the reaper, as an
unfrozen sandbox's do.

Not covered: a guard killed together with its server (e.g. a service
manager killing the whole process tree): then the reaper thaws them at the
next start, as before.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import anyio
import anyio.abc
import structlog

log = structlog.get_logger("gvisor_mcp.sandbox")


def guard_script(files: Path, value: str) -> str:
    """Wait for EOF (or a line) on stdin, then write `value` into every file
    `files` (a glob: `*` is its only wildcard) matches."""
    pattern = "*".join(shlex.quote(part) for part in str(files).split("*"))
    return (
        f'read -r _\nfor f in {pattern}; do [ -e "$f" ] && echo {shlex.quote(value)} > "$f"; done 2>/dev/null\nexit 0'
    )


class ThawGuard:
    def __init__(self, files: Path, value: str) -> None:
        """`files`, `value`: what Cgroup.thaw_write says for a leaf whose
        name is a glob over the Manager's container ids."""
        self._script = guard_script(files, value)
        self._process: anyio.abc.Process | None = None
        self._lock = anyio.Lock()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def ensure(self) -> None:
        """Start the guard unless it runs (raises OSError when it cannot: the
        caller then does not freeze)."""
        async with self._lock:
            if self._closed:
                raise OSError("the Manager is closing")
            if self._process is not None and self._process.returncode is None:
                return
            self._process = await anyio.open_process(
                ["/bin/sh", "-c", self._script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def aclose(self) -> None:
        """After the Manager stopped its sandboxes: EOF, and the guard exits."""
        self._closed = True
        proc, self._process = self._process, None
        if proc is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                if proc.stdin is not None:
                    await proc.stdin.aclose()
            except OSError:
                pass
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                log.warning("thaw_guard_stuck", pid=proc.pid)
                proc.kill()
                await proc.wait()
