"""What happened in one run, told honestly."""

from __future__ import annotations

import enum
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class ContainerStatus(enum.StrEnum):
    """Where a run is: the one status type, from the sandbox to the wire.

    The values are the strings clients see (a StrEnum: `str()`, f-strings
    and JSON give the value).

    running: still in flight (never the status of a ContainerResult).

    exited: the command ended by itself (any exit code, or a signal it got
        from inside the sandbox).
    timed_out: our deadline passed and we killed it.
    oom_killed: the sandbox cgroup's OOM counter rose during the run. Exit
        codes cannot tell this (gVisor gives 1, 0 or 137), so only the
        counter decides.
    killed: cancelled by the caller or by Manager.close().
    error: an infrastructure failure after the container existed.
    host_lost: never produced by a Manager: with `serve --backend ray`, the
        host running the command died or went silent mid-run; whether it ran
        is unknown, and it is never run again (runner.HostLost).
    """

    RUNNING = "running"
    EXITED = "exited"
    TIMED_OUT = "timed_out"
    OOM_KILLED = "oom_killed"
    KILLED = "killed"
    ERROR = "error"
    HOST_LOST = "host_lost"


class ContainerResult(BaseModel):
    """The outcome of one run.

    stdout/stderr hold at most max_output_bytes each: when a stream was
    longer, they hold its first half-cap bytes followed directly by its last
    half-cap bytes, `*_truncated` is set and `*_bytes` counts everything the
    command wrote. Durations are in seconds. `boot_duration` is the time until
    the sandbox was running the command; `duration` the whole call.
    """

    model_config = ConfigDict(frozen=True)

    container_id: str
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    duration: float = 0.0
    boot_duration: float = 0.0
    status: ContainerStatus
    oom_killed: bool = False
    peak_memory_bytes: int = 0
    signal: int | None = None
    """Signal number when the command died of one (exit code 128 + N)."""
    error: str | None = None
    """Why, when status is error."""
    warm: bool = False
    """Served by a pre-booted sandbox from the warm pool (boot_duration is then
    the time to claim it)."""
    network: dict[str, Any] | None = None
    """network=sandbox: what the network provider reported for this run
    (for the server's provider: per-destination egress accounting)."""

    @field_validator("status")
    @classmethod
    def _finished(cls, status: ContainerStatus) -> ContainerStatus:
        if status is ContainerStatus.RUNNING:
            raise ValueError("a ContainerResult is a finished run: status cannot be 'running'")
        return status

    def summary(self) -> str:
        """One line for logs and the CLI."""
        parts = [f"status={self.status.value}", f"exit_code={self.exit_code}"]
        if self.signal:
            parts.append(f"signal={self.signal}")
        parts += [
            f"duration={self.duration:.3f}s",
            f"boot={self.boot_duration:.3f}s",
            f"peak_memory={self.peak_memory_bytes}",
            f"stdout_bytes={self.stdout_bytes}{' (truncated)' if self.stdout_truncated else ''}",
            f"stderr_bytes={self.stderr_bytes}{' (truncated)' if self.stderr_truncated else ''}",
        ]
        if self.error:
            parts.append(f"error={self.error!r}")
        return " ".join(parts)

    def log_fields(self) -> dict:
        """The numbers a `run` log line carries (no output)."""
        return {
            "status": self.status.value,
            "exit_code": self.exit_code,
            "duration_ms": math.floor(self.duration * 1000),
            "boot_ms": math.floor(self.boot_duration * 1000),
            "peak_memory_bytes": self.peak_memory_bytes,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
        }
