"""What the sandbox needs from whoever provides `network: sandbox`.

The sandbox knows nothing of egress policy, proxies or accounting: it asks a
provider (given to the Manager; the server's is gvisor_mcp.network's
NetworkService) for a prepared network namespace per sandbox, points runsc
at it, tells the command the handle's environment (the proxy variables),
binds the run to it when the command starts, watches it for failure, and
closes it after runsc has exited. `ContainerOptions.egress` travels to
`start()` untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class NetworkHandle(Protocol):
    """One sandbox's prepared network namespace."""

    @property
    def netns_path(self) -> str:
        """The namespace runsc joins (the OCI spec's network namespace path)."""

    @property
    def env(self) -> Mapping[str, str]:
        """Variables the command gets (they win over the request's)."""

    failure: str | None
    """Set when the network side broke during the run: the run ends as `error`."""

    def start(self, run_id: str, egress: Any) -> None:
        """The run begins (cold: before runsc starts; pooled: at claim)."""

    def report(self) -> dict[str, Any] | None:
        """What the run did on the network, for ContainerResult.network (JSON-able, bounded)."""

    async def wait_failed(self) -> None:
        """Return once `failure` is set (never, normally)."""

    async def aclose(self) -> None:
        """After runsc has exited: release everything. Never raises."""


class NetworkProvider(Protocol):
    async def open(self, container_id: str) -> NetworkHandle:
        """Prepare a namespace for one sandbox; raise on any failure."""
