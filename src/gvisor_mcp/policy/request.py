"""What an agent may ask for in one call: the fields of execute_command.

Only wishes live here. Identity (tenant, session) and anything that names a
host path are deliberately absent: they come from the server, so no request
can change them. Values are checked against the policy by resolve(), which
explains a refusal in words the agent can act on; this model only rejects
what is not even the right type.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import denied_by


class ExecRequest(BaseModel):
    """One execute_command call. None means "whatever the policy's default is"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command: str = Field(min_length=1)
    """A shell command line; it runs as ("/bin/sh", "-c", command)."""
    workdir: str | None = None
    """Absolute, or relative to the policy's default working directory."""
    env: dict[str, str] | None = None
    stdin: str | bytes | None = None
    timeout_seconds: float | None = None
    cpus: float | None = None
    memory_mb: int | None = None
    max_pids: int | None = None
    network: str | None = None
    egress: list[str] | None = None
    """network=sandbox: narrow the policy's egress allowlist to these rules
    (each must lie within it); None keeps the whole allowlist."""
    image: str | None = None

    @classmethod
    def of(cls, **fields: Any) -> ExecRequest:
        """The request, or PolicyDenied saying which field is wrong (never a raw
        pydantic error: the agent reads it)."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise denied_by(e) from None

    @field_validator("network", mode="before")
    @classmethod
    def _enum_value(cls, v: Any) -> Any:
        # NetworkMode is a str enum; keep its plain value so messages read "host".
        return v.value if isinstance(v, enum.Enum) else v
