"""What goes wrong with a policy, said so the reader can fix it.

Two audiences: the operator, whose file is refused at load time with every
problem listed as `FILE:LINE: key.path: what is wrong; expected ...`, and the
agent, whose request is refused with what it asked, what is allowed and how
to ask again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigurationError, Refusal


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file, located as precisely as we can."""

    file: str
    line: int
    path: str
    message: str
    expected: str = ""

    def __str__(self) -> str:
        where = self.path or "(file)"
        text = f"{self.file}:{self.line}: {where}: {self.message}"
        if self.expected:
            text += f"; expected {self.expected}"
        return text


class PolicyError(ConfigurationError, ValueError):
    """A policy file that cannot be used; `problems` lists every problem found.

    Loading never returns a half-valid policy: the server keeps its previous
    policy (on reload) or refuses to start.
    """

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.file, p.line, p.path)))
        count = len(self.problems)
        head = f"invalid policy ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([head, *(str(p) for p in self.problems)]))


class UnknownTenant(ConfigurationError, LookupError):
    """A tenant name the policy does not define; a configuration error, not a denial.

    The agent cannot choose its tenant, so this is never shown as something
    to retry: the server should refuse to start (stdio) or refuse the token.
    """

    def __init__(self, tenant: str, known: tuple[str, ...]) -> None:
        self.tenant = tenant
        self.known = known
        super().__init__(f"tenant {tenant!r} is not defined in the policy; defined tenants: {', '.join(known)}")


class PolicyDenied(Refusal):
    """A request the policy refuses; str() is written for the agent that asked.

    `field` is the request field (e.g. "memory_mb"), `requested` its value,
    `allowed` a short description of what the policy allows and `hint` how to
    ask again.
    """

    def __init__(self, field: str, requested: Any, allowed: str, hint: str) -> None:
        self.field = field
        self.requested = requested
        self.allowed = allowed
        self.hint = hint
        shown = repr(requested)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"Policy denied {field}={shown}: allowed is {allowed}. {hint}")


def denied_by(error: ValidationError, hint: str = "Fix this field and ask again.") -> PolicyDenied:
    """A request model's validation error, said like the policy says a denial."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "request"
    return PolicyDenied(where, first.get("input"), first["msg"].removeprefix("Value error, "), hint)
