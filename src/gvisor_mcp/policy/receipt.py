"""The limits receipt: for every field, what was asked, what was granted and why.

It travels with every result (structured, JSON-friendly) so the agent and
the operator can see that the policy was applied, not assumed. `notes` holds
the lines worth showing in the tool text (anything clamped).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Rule = Literal["default", "requested", "clamped to ceiling", "policy"]
"""default: the request left it out; requested: granted as asked;
clamped to ceiling: asked for more, given the ceiling (on_exceed: clamp);
policy: not something a request can choose (user, capture cap, workspace)."""


class ReceiptEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    requested: Any = None
    granted: Any = None
    rule: Rule
    limit: Any = None
    """The ceiling that applied, when the field has one."""


class LimitsReceipt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    policy_sha256: str
    policy_source: str
    """A label, never a host path: the policy file's name (Policy.label)."""
    entries: tuple[ReceiptEntry, ...]
    notes: tuple[str, ...] = ()
    image_digest: str | None = None
    """The content digest of the store image the run used (None for `host` and directories)."""

    def get(self, field: str) -> ReceiptEntry:
        """The entry for `field` (KeyError when there is none)."""
        for entry in self.entries:
            if entry.field == field:
                return entry
        raise KeyError(field)

    def summary(self) -> str:
        """One line: `field=granted (rule)` for each field."""
        return ", ".join(f"{e.field}={e.granted} ({e.rule})" for e in self.entries)
