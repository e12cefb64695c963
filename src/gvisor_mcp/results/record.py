"""One run's record: each field defined once, from the sandbox's result to the wire.

    sandbox ContainerResult --RunOutcome.of()--> jobs --store.finish()--> SQLite row
        --StoredResult--> tools ExecResult (the structured content clients get)

`RunOutcome` is what a run reports when it ends (the store's columns are its
fields); `RunRecord` adds the result id, the status and the limits receipt;
`StoredResult` (store.py) adds the row's bookkeeping and `ExecResult`
(tools/models.py) the output excerpts the model reads. Status is the
sandbox's `ContainerStatus` all the way (a StrEnum of the wire strings);
its JSON schema is written out here so the published tool schema keeps
listing the values in the order clients have always seen.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from ..sandbox import ContainerResult, ContainerStatus

RunStatus = Annotated[
    ContainerStatus,
    WithJsonSchema(
        {
            "enum": ["exited", "timed_out", "oom_killed", "killed", "error", "running", "host_lost"],
            "title": "Status",
            "type": "string",
        }
    ),
]
"""A run's status on the wire: ContainerStatus, published inline as an enum."""


class EgressDestination(BaseModel):
    destination: str = Field(description="host:port the sandbox asked the egress proxy for")
    verdict: Literal["allowed", "denied", "failed"] = Field(
        description="denied: the policy refused it; failed: allowed, but it could not be reached"
    )
    reason: str | None = None
    connections: int
    bytes_up: int
    bytes_down: int


class NetworkReport(BaseModel):
    """network=sandbox: what the run did through its egress proxy."""

    proxy: str = Field(description="the proxy address the sandbox was given (HTTP_PROXY/HTTPS_PROXY)")
    connections: int
    denied: int
    bytes_up: int
    bytes_down: int
    destinations: list[EgressDestination] = Field(description="one row per destination and outcome (at most 64)")
    other_connections: int = Field(0, description="connections to destinations beyond the first 64")


class RunOutcome(BaseModel):
    """What a run reports when it ends; the result store keeps one column per field."""

    model_config = ConfigDict(frozen=True)

    container_id: str | None = None
    exit_code: int | None = Field(None, description="null while running or when it never ran")
    signal: int | None = Field(None, description="signal number when the command died of one")
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = Field(0, description="bytes the command wrote to stdout (all of them)")
    stderr_bytes: int = 0
    duration_ms: int | None = None
    boot_ms: int | None = Field(None, description="time until the sandbox was running the command")
    warm: bool = Field(False, description="ran in a pre-booted sandbox (boot_ms is then the claim time)")
    oom_killed: bool = False
    peak_memory_bytes: int | None = None
    error: str | None = None
    network: NetworkReport | None = Field(None, description="network=sandbox: egress per destination")

    @classmethod
    def of(cls, result: ContainerResult, *, error: str | None) -> RunOutcome:
        """The outcome of a sandbox result (`error`: what the caller says about it)."""
        return cls(
            container_id=result.container_id,
            exit_code=result.exit_code,
            signal=result.signal,
            duration_ms=round(result.duration * 1000),
            boot_ms=round(result.boot_duration * 1000),
            oom_killed=result.oom_killed,
            peak_memory_bytes=result.peak_memory_bytes,
            stdout_bytes=result.stdout_bytes,
            stderr_bytes=result.stderr_bytes,
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            warm=result.warm,
            network=NetworkReport.model_validate(result.network) if result.network is not None else None,
            error=error,
        )


class RunRecord(RunOutcome):
    """A run as the server records and shows it: its id, status and limits receipt."""

    result_id: str = Field(description="Pass to inspect_result / cancel_command.")
    status: RunStatus
    limits: dict[str, Any] | None = Field(None, description="what was requested, granted, and why")


__all__ = ["EgressDestination", "NetworkReport", "RunOutcome", "RunRecord", "RunStatus"]
