"""The warm sandbox's init: a shell stub waiting on stdin for one claim line.

A pooled sandbox boots with STUB_COMMAND as its init process. Claiming it
writes one line, `claim_line()`: `cd WORKDIR`, then the command with exactly
the environment a cold run would have; the rest of stdin is the command's.
With an EXIT_MARK the stub reports the command's exit status as soon as it
ends (see output.pump, which finds the mark).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

from .options import ContainerOptions

# The stub: `nl` lets the claim line carry newlines inside quoted arguments.
STUB_COMMAND: tuple[str, ...] = (
    "/bin/sh",
    "-c",
    "nl='\n'; IFS= read -r line && eval \"$line\"",
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
