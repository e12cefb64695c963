"""The sandbox's errors: one base class, two branches.

- `SandboxRefusal`: the request was refused before anything was created.
  The caller (and the agent behind it) reads the message, changes the
  request and asks again: `InvalidOptionsError`, `ManagerClosedError`.
- `SandboxError`: an infrastructure failure (runsc, cgroups, disk) before
  the command could run; `RunscError` when runsc itself failed. The operator
  reads these.

A command that fails is not an error: it is a `ContainerResult`. Anything
else that escapes the sandbox is a bug and should propagate with its
traceback. The branches slot under the package's family (gvisor_mcp.errors,
a leaf module that imports nothing, so the sandbox still imports nothing
from above): `SandboxRefusal` is a `Refusal`, `SandboxError` an
`InfrastructureError`.
"""

from __future__ import annotations

from typing import Any

from ..errors import GvisorMcpError, InfrastructureError, Refusal


class SandboxBaseError(GvisorMcpError):
    """Every error the sandbox package raises on purpose."""


class SandboxRefusal(SandboxBaseError, Refusal):
    """Refused before anything was created; nothing to clean up."""


class InvalidOptionsError(SandboxRefusal, ValueError):
    """A request the sandbox refuses before creating anything.

    Carries the field, the offending value and what is allowed, so callers
    (the CLI, the MCP tools) can show an actionable message.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


class ManagerClosedError(SandboxRefusal, RuntimeError):
    """run() after close()."""

    def __init__(self) -> None:
        super().__init__("gvisor manager is closed")


class SandboxError(SandboxBaseError, InfrastructureError, RuntimeError):
    """An infrastructure failure before the command could run (runsc, cgroups, disk)."""


class RunscError(SandboxError):
    """runsc itself failed (not the command it ran)."""
