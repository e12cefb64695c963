"""What a caller may ask of one sandboxed run, validated before anything exists.

Every check here is pure (no filesystem) except `ContainerOptions.check_paths`,
which the Manager calls right before it creates anything: a bad request must
fail with a message naming the field, the value and what is allowed, and must
leave nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import enum
import posixpath
import re
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidOptionsError

DEFAULT_TIMEOUT: float = 120.0
"""Seconds; the seed's 120 * time.Second."""
DEFAULT_MEMORY_MB: int = 512
DEFAULT_MAX_PIDS: int = 1024
DEFAULT_MAX_OUTPUT: int = 10 * 1024 * 1024
MAX_CONTAINER_NAME_LEN: int = 64

# Ceilings past which a value is a mistake, not a wish: they keep a typo
# (memory_mb=10**9) from reaching runsc or the kernel as something odd.
MAX_CPUS: float = 1024.0
MAX_MEMORY_MB: int = 1024 * 1024  # 1 TiB
MAX_PIDS: int = 4 * 1024 * 1024
MAX_TIMEOUT: float = 7 * 24 * 3600.0
MAX_OUTPUT_BYTES: int = 1024 * 1024 * 1024
MAX_ARGS: int = 4096
MAX_ARGV_BYTES: int = 1024 * 1024
MAX_ENV: int = 1024
MAX_ENV_BYTES: int = 1024 * 1024

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

StdoutWriter = Callable[[bytes], "Awaitable[None] | None"]
"""Receives each chunk as the command writes it (sync or async callable)."""

StdinSource = bytes | AsyncIterable[bytes]


def _problem(field: str, value: Any, allowed: str) -> ValueError:
    # pydantic wraps ValueErrors raised inside validators; the text is what
    # survives, so it must stand on its own.
    return ValueError(str(InvalidOptionsError(field, value, allowed)))


def _check_no_nul(field: str, value: str) -> None:
    if "\x00" in value:
        raise _problem(field, value, "NUL characters cannot be passed to a process")


def _check_abs_path(field: str, value: str) -> str:
    _check_no_nul(field, value)
    if not value.startswith("/"):
        raise _problem(field, value, "an absolute path inside the container, like /tmp")
    if any(part == ".." for part in value.split("/")):
        raise _problem(field, value, "a path without '..' components")
    if len(value.encode()) > 4096:
        raise _problem(field, value, "a path of at most 4096 bytes")
    return posixpath.normpath(value) if value != "/" else "/"


def _seconds(value: Any) -> Any:
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    return value


Seconds = Annotated[float, BeforeValidator(_seconds)]


class NetworkMode(str, enum.Enum):  # noqa: UP042  (StrEnum would change what str() of a member gives)
    """How the sandbox reaches the network.

    none: only the sandbox's own loopback (the default).
    sandbox: gVisor's own network stack in a per-run namespace.
    host: the host's network, shared; only for explicitly trusting policies.
    """

    NONE = "none"
    SANDBOX = "sandbox"
    HOST = "host"


class ResourceSpec(BaseModel):
    """Limits for one run. Zero means "use the Manager's default" (see ManagerConfig).

    The seed's zero semantics (0 CPUs / 0 MB = unlimited, 0 timeout = none)
    apply only when the Manager's defaults are zero too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpus: float = 0.0
    memory_mb: int = 0
    max_pids: int = 0
    timeout: Seconds = 0.0
    max_output_bytes: int = 0

    @model_validator(mode="after")
    def _sensible(self) -> ResourceSpec:
        validate_resources(self)
        return self

    def merged_over(self, defaults: ResourceSpec) -> ResourceSpec:
        """Fill each zero field from `defaults`."""
        return ResourceSpec.model_construct(
            **{name: getattr(self, name) or getattr(defaults, name) for name in ResourceSpec.model_fields}
        )


def validate_resources(res: ResourceSpec) -> None:
    """Raise InvalidOptionsError when a limit is negative, not finite or absurd."""
    checks: list[tuple[str, float, float, str]] = [
        ("resources.cpus", res.cpus, MAX_CPUS, "CPU cores (0 = no limit)"),
        ("resources.memory_mb", res.memory_mb, MAX_MEMORY_MB, "MiB (0 = default)"),
        ("resources.max_pids", res.max_pids, MAX_PIDS, "processes (0 = default)"),
        ("resources.timeout", res.timeout, MAX_TIMEOUT, "seconds (0 = default)"),
        (
            "resources.max_output_bytes",
            res.max_output_bytes,
            MAX_OUTPUT_BYTES,
            "bytes per stream (0 = default)",
        ),
    ]
    for field, value, ceiling, unit in checks:
        if not (value == value) or value in (float("inf"), float("-inf")):
            raise InvalidOptionsError(field, value, f"a finite number of {unit}")
        if value < 0 or value > ceiling:
            shown = f"{ceiling:,.0f}" if ceiling >= 100 else f"{ceiling:g}"
            raise InvalidOptionsError(field, value, f"0 to {shown} {unit}")
    if 0 < res.cpus < 0.01:
        raise InvalidOptionsError("resources.cpus", res.cpus, "at least 0.01 CPU (or 0 for no limit)")
    if 0 < res.memory_mb < 16:
        raise InvalidOptionsError(
            "resources.memory_mb",
            res.memory_mb,
            "at least 16 MiB (the sandbox itself needs ~12 MiB), or 0 for the default",
        )
    if 0 < res.max_pids < 4:
        raise InvalidOptionsError("resources.max_pids", res.max_pids, "at least 4 processes, or 0 for the default")


class UserSpec(BaseModel):
    """uid:gid inside the sandbox (gVisor's own user namespace, not the host's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uid: int = Field(ge=0, le=2**31 - 2)
    gid: int = Field(ge=0, le=2**31 - 2)

    @classmethod
    def parse(cls, text: str) -> UserSpec:
        """Accept "1000:1000" or "1000" (gid = uid)."""
        uid, _, gid = text.partition(":")
        try:
            return cls(uid=int(uid), gid=int(gid or uid))
        except (ValueError, ValidationError):
            raise InvalidOptionsError("user", text, "UID[:GID] with numbers 0..2147483646") from None


class Mount(BaseModel):
    """An extra mount: a host directory (bind) or a size-bounded tmpfs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    destination: str
    source: str = ""
    type: str = "bind"
    read_only: bool = True
    size_mb: int = Field(default=0, ge=0, le=MAX_MEMORY_MB)
    """tmpfs only: size limit (0 = 64 MiB)."""

    @field_validator("destination")
    @classmethod
    def _dest(cls, v: str) -> str:
        v = _check_abs_path("mount.destination", v)
        if v == "/":
            raise _problem("mount.destination", v, "a directory below /, not the root itself")
        if v.split("/")[1] in ("proc", "sys", "dev"):
            raise _problem("mount.destination", v, "a path outside /proc, /sys and /dev")
        return v

    @model_validator(mode="after")
    def _kind(self) -> Mount:
        if self.type not in ("bind", "tmpfs"):
            raise _problem("mount.type", self.type, "'bind' or 'tmpfs'")
        if self.type == "bind":
            _check_no_nul("mount.source", self.source)
            if not self.source.startswith("/"):
                raise _problem("mount.source", self.source, "an absolute host path for a bind mount")
        return self


class ContainerOptions(BaseModel):
    """One command to run in a fresh sandbox.

    `command` is an argv (no shell is implied). `env` None means a minimal
    default environment. `rootfs` None means the built-in default image (see
    rootfs.py). `user` None means root inside the sandbox, as the seed says;
    the policy layer defaults to 1000:1000.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    command: tuple[str, ...]
    workdir: str = "/"
    env: dict[str, str] | None = None
    rootfs: str | None = None
    resources: ResourceSpec = ResourceSpec()
    network: NetworkMode = NetworkMode.NONE
    stdin: bytes | AsyncIterable[bytes] | None = None
    stdout_writer: Callable[[bytes], Any] | None = None
    stderr_writer: Callable[[bytes], Any] | None = None
    user: UserSpec | None = None
    read_only_rootfs: bool = False
    extra_mounts: tuple[Mount, ...] = ()
    egress: Any = None
    """network=sandbox only: handed untouched to the network provider's
    handle when the run starts (the server puts the run's egress grant here)."""

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise _problem("command", v, "a list of arguments, e.g. ['/bin/sh', '-c', 'echo hi']")
        return v

    @field_validator("command")
    @classmethod
    def _command_items(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or not v[0]:
            raise _problem("command", list(v), "a non-empty argv whose first item is the program")
        if len(v) > MAX_ARGS:
            raise _problem("command", f"<{len(v)} arguments>", f"at most {MAX_ARGS} arguments")
        if sum(len(a.encode()) + 1 for a in v) > MAX_ARGV_BYTES:
            raise _problem("command", "<argv>", f"at most {MAX_ARGV_BYTES} bytes of arguments")
        for i, arg in enumerate(v):
            _check_no_nul(f"command[{i}]", arg)
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        return _check_abs_path("workdir", v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_ENV:
            raise _problem("env", f"<{len(v)} variables>", f"at most {MAX_ENV} variables")
        if sum(len(k) + len(val) + 2 for k, val in v.items()) > MAX_ENV_BYTES:
            raise _problem("env", "<environment>", f"at most {MAX_ENV_BYTES} bytes in total")
        for key, val in v.items():
            if not ENV_KEY_RE.match(key):
                raise _problem("env key", key, "letters, digits and '_', not starting with a digit (no '=')")
            _check_no_nul(f"env[{key}]", val)
        return v

    @field_validator("rootfs")
    @classmethod
    def _rootfs(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _check_no_nul("rootfs", v)
        if not v.startswith("/"):
            raise _problem("rootfs", v, "an absolute host path to a root filesystem directory")
        return v

    @field_validator("stdin", mode="before")
    @classmethod
    def _stdin(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.encode()
        if v is None or isinstance(v, (bytes, bytearray)) or hasattr(v, "__aiter__"):
            return bytes(v) if isinstance(v, bytearray) else v
        raise _problem("stdin", type(v).__name__, "bytes, str or an async iterable of bytes")

    @model_validator(mode="after")
    def _mounts(self) -> ContainerOptions:
        seen: set[str] = set()
        for m in self.extra_mounts:
            if m.destination in seen:
                raise _problem("mount.destination", m.destination, "each destination at most once")
            seen.add(m.destination)
        return self

    def check_paths(self) -> None:
        """Checks that need the host filesystem; raise InvalidOptionsError."""
        if self.rootfs is not None and not Path(self.rootfs).is_dir():
            raise InvalidOptionsError("rootfs", self.rootfs, "an existing host directory")
        for m in self.extra_mounts:
            if m.type == "bind" and not Path(m.source).exists():
                raise InvalidOptionsError("mount.source", m.source, "an existing host path")

    def validate(self) -> None:  # type: ignore[override]  # the seed's Validate(); pydantic's deprecated classmethod of that name is unused
        """The seed's Validate(): everything, including the filesystem checks."""
        validate_resources(self.resources)
        self.check_paths()
