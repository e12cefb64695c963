"""Run commands in fresh gVisor sandboxes: the seed's Manager API in Python.

Knows nothing of MCP or policy; see manager.py for how a run works and
docs/design-notes.md ("sandbox/ layout") for which module holds what.
"""

from .api import ManagerAPI, RunView
from .cgroups import CgroupStats
from .config import ManagerConfig
from .container import Container
from .errors import (
    InvalidOptionsError,
    ManagerClosedError,
    RunscError,
    SandboxBaseError,
    SandboxError,
    SandboxRefusal,
)
from .manager import Manager
from .options import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_PIDS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    MAX_CONTAINER_NAME_LEN,
    ContainerOptions,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
    validate_resources,
)
from .result import ContainerResult, ContainerStatus
from .spec import CgroupV2Entry, build_spec, to_cgroup_v2_entries

ActiveRun = Container
"""The name active_runs()' items had before Container merged them with the
sandbox they run in."""

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_PIDS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT",
    "MAX_CONTAINER_NAME_LEN",
    "ActiveRun",
    "CgroupStats",
    "CgroupV2Entry",
    "Container",
    "ContainerOptions",
    "ContainerResult",
    "ContainerStatus",
    "InvalidOptionsError",
    "Manager",
    "ManagerClosedError",
    "ManagerAPI",
    "ManagerConfig",
    "Mount",
    "NetworkMode",
    "ResourceSpec",
    "RunView",
    "RunscError",
    "SandboxBaseError",
    "SandboxError",
    "SandboxRefusal",
    "UserSpec",
    "build_spec",
    "to_cgroup_v2_entries",
    "validate_resources",
]
