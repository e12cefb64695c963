"""Run commands in fresh gVisor sandboxes: the seed's Manager API in Python.

Knows nothing of MCP or policy; see manager.py for how a run works.
"""

from .cgroups import CgroupStats
from .manager import ActiveRun, Manager, ManagerClosedError, ManagerConfig, SandboxError
from .options import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_PIDS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    MAX_CONTAINER_NAME_LEN,
    ContainerOptions,
    InvalidOptionsError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
    validate_resources,
)
from .result import ContainerResult, ContainerStatus
from .runsc import RunscError
from .spec import CgroupV2Entry, build_spec, to_cgroup_v2_entries

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_PIDS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT",
    "MAX_CONTAINER_NAME_LEN",
    "ActiveRun",
    "CgroupStats",
    "CgroupV2Entry",
    "ContainerOptions",
    "ContainerResult",
    "ContainerStatus",
    "InvalidOptionsError",
    "Manager",
    "ManagerClosedError",
    "ManagerConfig",
    "Mount",
    "NetworkMode",
    "ResourceSpec",
    "RunscError",
    "SandboxError",
    "UserSpec",
    "build_spec",
    "to_cgroup_v2_entries",
    "validate_resources",
]
