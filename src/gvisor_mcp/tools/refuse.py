"""The one place the package's errors become what the agent reads.

Every tool call that ends in one of the package's errors comes through
`answer()` (tools/boundary.SafeServer calls it), by branch
(gvisor_mcp/errors.py):

- a `Refusal` (the policy, a ceiling, a quota or the call rate, an unknown
  image or workspace, an argument outside the schema's enums or of the
  wrong type): its message says what was asked, what is allowed and how to
  ask again; ONE audit line (decision denied or quota) and ONE count in
  `gvisor_mcp_denied_total{kind}`.
- a `ConfigurationError` that reaches a call (the caller's tenant left the
  policy on a reload): said as it is, audited and counted as kind `config`.
- an `InfrastructureError`: `for_agent()` (nothing ran; retry later); one
  audit line with decision failed. The operator's log has the details.

Anything else is a bug: SafeServer lets the SDK answer with its generic
error and log the traceback.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError

from ..errors import ConfigurationError, GvisorMcpError, InfrastructureError, Refusal
from ..runtime import TenantState
from ..text import render
from .context import ToolContext

MAX_SHOWN_VALUE = 120
"""Characters of a refused argument's value quoted back (like PolicyDenied)."""

_EXPECTED = {
    "bool_type": "a JSON boolean: true or false",
    "int_type": "a whole number (a JSON integer, not a string)",
    "float_type": "a number (not a string)",
    "string_type": "a string",
    "dict_type": "a JSON object",
    "list_type": "a JSON array",
    "missing": "a value: this argument is required",
}


class ArgumentRefused(Refusal):
    """A tool call whose arguments fail the tool's schema (before the tool runs).

    Values outside a schema enum (network, image...) are the policy's choices
    published as enums: they read like a policy denial and count as kind
    `policy`; anything else (a string for a number...) counts as `arguments`.
    Audited at most once a second per tenant and kind: such calls never reach
    the tool, so runs_per_minute does not hold them back.
    """

    throttled = True

    def __init__(self, tool: str, error: ValidationError) -> None:
        lines = []
        literal = 0
        for err in error.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "arguments"
            shown = repr(err.get("input"))
            if len(shown) > MAX_SHOWN_VALUE:
                shown = shown[: MAX_SHOWN_VALUE - 3] + "..."
            if err["type"] == "missing":
                lines.append(f"{where} is missing: it is required. Ask again with {where} set.")
            elif err["type"] == "literal_error":
                literal += 1
                # pydantic says "'a', 'b' or 'c'": the policy's way is a list.
                allowed = str((err.get("ctx") or {}).get("expected", "")).replace("' or '", "', '")
                lines.append(
                    f"Policy denied {where}={shown}: allowed is one of {allowed}. "
                    f"Ask again with {where} set to one of those, or leave it out to get the default."
                )
            else:
                expected = _EXPECTED.get(err["type"]) or err["msg"].removeprefix("Value error, ")
                lines.append(
                    f"{where}={shown} is not accepted: expected {expected}. "
                    f"Ask again with {where} fixed, or leave it out to get its default."
                )
        self.kind = "policy" if lines and literal == len(lines) else "arguments"
        super().__init__(f"Invalid arguments for {tool}: " + " ".join(lines))


def argument_error(tool: str, error: ValidationError) -> str:
    """What was wrong with a call's arguments, written for the agent that sent them."""
    return str(ArgumentRefused(tool, error))


def answer(error: GvisorMcpError, tool: str, arguments: dict[str, Any], ctx: ToolContext | None) -> ToolError:
    """Audit and count `error` for the caller; the ToolError the agent reads."""
    if isinstance(error, InfrastructureError):
        text, decision, kind = error.for_agent(), "failed", None
    elif isinstance(error, Refusal):
        text, decision, kind = str(error), error.decision, error.kind
    elif isinstance(error, ConfigurationError):
        text, decision, kind = str(error), "denied", "config"
    else:  # a new branch nobody mapped: say it as it is
        text, decision, kind = str(error), "denied", "other"
    app = _tenant_state(ctx)
    if app is not None:
        _record(app, ctx, error, tool, arguments, text, decision, kind)
    return ToolError(render(text))


def _tenant_state(ctx: ToolContext | None) -> TenantState | None:
    try:
        app = ctx.request_context.lifespan_context if ctx is not None else None
    except ValueError:  # a context outside a request (the SDK's own calls)
        return None
    return app if isinstance(app, TenantState) else None


def _record(
    app: TenantState,
    ctx: Any,
    error: GvisorMcpError,
    tool: str,
    arguments: dict[str, Any],
    text: str,
    decision: str,
    kind: str | None,
) -> None:
    """One audit line and, for a refusal, one count."""
    try:
        session = app.caller(ctx).session_id
    except Exception:  # the session cannot be told (e.g. a request gone): the tenant still is
        session = None
    command = arguments.get("command") if tool == "execute_command" else None
    entry: dict[str, Any] = dict(
        tenant=app.tenant,
        session=session,
        tool=tool,
        policy_hash=app.policy.current.sha256,
        decision=decision,
        reason=text,
    )
    if isinstance(command, str):
        entry["command"] = command
    if isinstance(error, Refusal) and error.throttled:
        app.audit.write_throttled(key=f"{kind}:{app.tenant}", **entry)
    else:
        app.audit.write(**entry)
    if kind is not None and app.metrics is not None:
        app.metrics.denied(app.tenant, kind)


__all__ = ["ArgumentRefused", "answer", "argument_error"]
