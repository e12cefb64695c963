"""The package's one error family: a base and three branches, by who reads it.

- `Refusal`: a request the server will not carry out as asked (bad options,
  policy, quota, an unknown workspace or image). The AGENT reads it: its
  text says what was asked, what is allowed and how to ask again. The tool
  layer turns every refusal into one audited, counted, rendered error
  (tools/refuse.py); `kind` names the metric label, `decision` the audit
  decision.
- `ConfigurationError`: the OPERATOR's configuration cannot be used (a policy
  file, a tenant, a tokens file, a flag). `serve` refuses to start with it;
  a reload keeps the previous configuration.
- `InfrastructureError`: the host failed us (runsc, cgroups, a full disk, a
  mount). The operator's log has the details; the agent gets `for_agent()`,
  which says nothing ran and to retry later.

Anything else that escapes a tool is a bug: it propagates, and the log has
its traceback. This module imports nothing from the package, so every layer
(the sandbox included) may build on it without importing upward.
"""

from __future__ import annotations


class GvisorMcpError(Exception):
    """Every error gvisor-mcp raises on purpose."""


class Refusal(GvisorMcpError):
    """Refused before anything ran; the agent reads the message and asks again."""

    kind: str = "policy"
    """The `gvisor_mcp_denied_total{kind=...}` label: policy, quota, rate, arguments, workspace."""
    decision: str = "denied"
    """The audit line's decision: denied, or quota for a quota or rate refusal."""
    throttled: bool = False
    """Audited at most once a second per tenant and kind (a client looping on
    a rate refusal must not fill the audit log); the next line counts the rest."""


class ConfigurationError(GvisorMcpError):
    """The operator's configuration cannot be used; the operator reads it."""


class InfrastructureError(GvisorMcpError):
    """The host failed before the command could run (or be recorded)."""

    def for_agent(self) -> str:
        """What the agent reads: nothing ran, retry later (no host details)."""
        return (
            f"the server could not run this call, so nothing was run: {self}. "
            "Retry later; if it persists, tell the operator."
        )


class StateUnavailable(InfrastructureError):
    """The server cannot record a call (the result store or the audit log):
    its state disk is probably full. No command runs unrecorded."""

    def for_agent(self) -> str:
        return (
            f"the server cannot record this call, so nothing was run: {self}. Its state disk is "
            "probably full; earlier results are kept. Retry later, once the operator has freed space."
        )


__all__ = ["ConfigurationError", "GvisorMcpError", "InfrastructureError", "Refusal", "StateUnavailable"]
