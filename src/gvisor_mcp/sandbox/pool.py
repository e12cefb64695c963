"""Warm pool: sandboxes booted ahead of time, each handed out exactly once.

A pooled sandbox is a normal foreground `runsc run` whose init process is a
tiny shell stub waiting on stdin for one line. Claiming it writes that line:
`cd WORKDIR && exec /usr/bin/env -i ENV... ARGV...`, so the command replaces
the stub as PID 1 with exactly the environment and directory a cold run
would have; the rest of stdin is the command's. Limits are written into the
sandbox's cgroup at claim time (we own it), and its peak-memory counter is
reset, so a warm hit enforces and reports what a cold run does. What cannot
change after boot — image, mounts, user, network, process limit — is the
pool key: a request whose key has no ready sandbox takes the cold path.

Never reused: after its command exits the sandbox is gone, like a cold one.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from .options import ContainerOptions, ResourceSpec

# The stub: `nl` lets the claim line carry newlines inside quoted arguments.
STUB_COMMAND: tuple[str, ...] = (
    "/bin/sh",
    "-c",
    "nl='\n'; IFS= read -r line && eval \"$line\"",
)


PoolKey = tuple[Any, ...]


def pool_key(options: ContainerOptions, res: ResourceSpec) -> PoolKey | None:
    """What a pooled sandbox must match; None when the request cannot be pooled.

    Only the built-in image is pooled (it is known to have /bin/sh and
    /usr/bin/env); a first argument containing '=' would be read by env as
    an assignment.
    """
    if options.rootfs is not None or "=" in options.command[0]:
        return None
    return (
        options.network.value,
        (options.user.uid, options.user.gid) if options.user else None,
        options.read_only_rootfs,
        tuple(m.model_dump_json() for m in options.extra_mounts),
        res.max_pids,
    )


def _q(value: str) -> str:
    """Shell-quote for the one-line claim: newlines become "$nl"."""
    return '"$nl"'.join(shlex.quote(part) for part in value.split("\n"))


EXIT_MARK = "@@gvisor-mcp-exit-{nonce}@@"
"""Written by the stub after the command exits: alone on stdout, with the
exit status (3 digits) on stderr. Lets the Manager answer as soon as the
command is done instead of after the sandbox's teardown (~50 ms); the nonce is
fresh per run, so no output can end a stream early by accident. (A command
that dug the nonce out of the stub shell's memory could only misreport its
own exit status and cut its own output: nothing it could not do anyway.)"""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def claim_line(
    options: ContainerOptions,
    env: dict[str, str],
    mark: str | None = None,
    inherited: Iterable[str] = (),
) -> bytes:
    """The one line the stub evals: cd, then the command with exactly `env`.

    With `mark`, the command runs as the stub's child and the stub reports
    its status after it (see EXIT_MARK); without, the stub execs it.
    `inherited` names the variables the stub itself was started with: when
    they and `env`'s keys are all shell names, a subshell unsets them (and
    the PWD/OLDPWD dash exports), exports exactly `env` and execs: one
    exec in the sandbox instead of two through /usr/bin/env -i (an exec
    costs ~20-25 ms under gVisor here).
    """
    argv = " ".join(_q(a) for a in options.command)
    # The same environment as a cold run: a cold run outside `/` starts through
    # spec.CHDIR_SHIM, whose `cd` exports PWD (and which unsets OLDPWD).
    if options.workdir != "/":
        env = {"PWD": options.workdir, **env}
    names = set(inherited) | set(env)
    if mark is not None and inherited and all(_NAME.match(n) for n in names):
        clear = " ".join(sorted(set(inherited) | {"PWD", "OLDPWD"}))
        exports = " ".join(_q(f"{k}={v}") for k, v in env.items())
        run = f"(unset {clear}; export {exports}; exec {argv})"
    else:
        assignments = " ".join(_q(f"{k}={v}") for k, v in env.items())
        run = f"/usr/bin/env -i -- {assignments} {argv}"
    if mark is None:
        return f"cd {_q(options.workdir)} && exec {run}\n".encode()
    return (
        f"cd {_q(options.workdir)} || exit $?; {run}; rc=$?; "
        f"printf %s {mark}; printf %s%03d {mark} $rc >&2; exit $rc\n"
    ).encode()


@dataclass
class WarmSandbox:
    container_id: str
    key: PoolKey
    sandbox: Any  # manager.Sandbox
    booted_at: float = field(default_factory=time.monotonic)
    env_keys: tuple[str, ...] = ()
    """The variables the stub was started with (its spec's environment)."""


@dataclass
class PoolTarget:
    template: ContainerOptions
    size: int


class WarmPool:
    """Bookkeeping only; booting and destroying is the Manager's job."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.targets: dict[PoolKey, PoolTarget] = {}
        self.ready: dict[PoolKey, list[WarmSandbox]] = {}
        self.booting: dict[PoolKey, int] = {}
        self.hits = 0
        self.misses = 0
        self.changed = anyio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def claim(self, key: PoolKey | None) -> WarmSandbox | None:
        if key is None or key not in self.targets:
            return None
        ready = self.ready.get(key, [])
        now = time.monotonic()
        while ready:
            warm = ready.pop()  # newest first
            if now - warm.booted_at <= self.max_age:
                self.hits += 1
                self.wake()
                return warm
            ready.insert(0, warm)  # expired: left for the maintainer
            break
        self.misses += 1
        self.wake()
        return None

    def idle(self) -> int:
        return sum(len(v) for v in self.ready.values())

    def in_flight(self) -> int:
        return self.idle() + sum(self.booting.values())

    def container_ids(self) -> set[str]:
        return {w.container_id for v in self.ready.values() for w in v}

    def expired(self) -> list[WarmSandbox]:
        now = time.monotonic()
        out = []
        for key, ready in self.ready.items():
            keep = [w for w in ready if now - w.booted_at <= self.max_age]
            out += [w for w in ready if now - w.booted_at > self.max_age]
            self.ready[key] = keep
        return out

    def take_oldest(self) -> WarmSandbox | None:
        """Evict one idle sandbox (to make room for a cold run)."""
        best: WarmSandbox | None = None
        for ready in self.ready.values():
            for w in ready:
                if best is None or w.booted_at < best.booted_at:
                    best = w
        if best is not None:
            self.ready[best.key].remove(best)
        return best

    def take_all(self) -> list[WarmSandbox]:
        out = [w for v in self.ready.values() for w in v]
        self.ready.clear()
        return out
