"""The warm sandbox's init: a shell stub that forks, at boot, the process
that will become the command.

A pooled sandbox boots with STUB_COMMAND as its init process (PID 1). At
boot the pool writes one line to its stdin, the run's EXIT_MARK; the stub
reads it and forks a subshell that waits for the claim line. Claiming the
sandbox writes that line, `claim_line()`: `cd WORKDIR`, then an exec of the
command with exactly the environment a cold run would have; the rest of
stdin is the command's. When the command ends, PID 1 reports its exit
status with the mark (see output.pump, which finds it), so the Manager
answers before the sandbox has exited.

Forking at boot takes the fork off the claim: under gVisor a fork (a new
address space: a new systrap stub process on the host) cost ~10-30 ms of a
warm call here, as much as the exec itself.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from .options import ContainerOptions

STUB_COMMAND: tuple[str, ...] = (
    "/bin/sh",
    "-c",
    # `nl` lets the claim line carry newlines inside quoted arguments. The
    # subshell is the command's process: forked now, it blocks on stdin.
    "IFS= read -r mark || exit 1; nl='\n'; "
    '(IFS= read -r line && eval "$line"); rc=$?; '
    'printf %s "$mark"; printf %s%03d "$mark" "$rc" >&2; exit "$rc"',
)


def _q(value: str) -> str:
    """Shell-quote for the one-line claim: newlines become "$nl"."""
    return '"$nl"'.join(shlex.quote(part) for part in value.split("\n"))


EXIT_MARK = "@@gvisor-mcp-exit-{nonce}@@"
"""Written by the stub after the command exits: alone on stdout, with the
exit status (3 digits) on stderr. Lets the Manager answer as soon as the
command is done instead of after the sandbox's teardown (~50 ms); the nonce is
fresh per sandbox, handed to the stub on stdin (never in its argv or
environment, which `ps` or /proc/1/cmdline would print), so no output can end
a stream early by accident. (A command that dug the nonce out of the stub
shell's memory could only misreport its own exit status and cut its own
output: nothing it could not do anyway.)"""


def boot_line(mark: str) -> bytes:
    """The first line a pooled stub reads: its exit mark."""
    return f"{mark}\n".encode()


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def claim_line(
    options: ContainerOptions,
    env: dict[str, str],
    inherited: Iterable[str] = (),
) -> bytes:
    """The one line the stub's forked subshell evals: cd, then an exec of the
    command with exactly `env`.

    `inherited` names the variables the stub itself was started with: when
    they and `env`'s keys are all shell names, the subshell unsets them (and
    the PWD/OLDPWD dash exports), exports exactly `env` and execs the
    command: its one exec in the sandbox (an exec costs ~20-25 ms under
    gVisor here). Otherwise it execs /usr/bin/env -i with the variables.
    """
    argv = " ".join(_q(a) for a in options.command)
    # The same environment as a cold run: a cold run outside `/` starts through
    # spec.CHDIR_SHIM, whose `cd` exports PWD (and which unsets OLDPWD).
    if options.workdir != "/":
        env = {"PWD": options.workdir, **env}
    names = set(inherited) | set(env)
    if inherited and all(_NAME.match(n) for n in names):
        clear = " ".join(sorted(set(inherited) | {"PWD", "OLDPWD"}))
        exports = " ".join(_q(f"{k}={v}") for k, v in env.items())
        run = f"unset {clear}; export {exports}; exec {argv}"
    else:
        assignments = " ".join(_q(f"{k}={v}") for k, v in env.items())
        run = f"exec /usr/bin/env -i -- {assignments} {argv}"
    return f"cd {_q(options.workdir)} || exit $?; {run}\n".encode()
