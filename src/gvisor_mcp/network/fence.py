"""Addresses and ports no sandbox may reach, whatever its allowlist says.

The guard (guard.py) refuses internal addresses unless a CIDR rule of the
run's allowlist names them: an operator may open an internal mirror. A
fence is stronger: it wins over every rule. A host that runs sandboxes for
a Ray cluster (cluster/agent.py) fences off every node of the cluster (all
ports: raylets, object managers and Ray's workers listen on the node
address) and Ray's well-known ports on any address (GCS, client server,
dashboard, metrics), so no policy, however wide, lets a sandbox talk to
the cluster that placed it. The single-host server has no fence.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from .egress import IPAddress
from .guard import unwrap

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Fence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    networks: tuple[IPNetwork, ...] = ()
    """Every port of these is refused (a node address is a /32 or /128)."""
    ports: frozenset[int] = frozenset()
    """These ports are refused on every address."""
    label: str = "the Ray cluster"
    """Named in the refusal: what is behind the fence."""

    @field_validator("networks", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        return tuple(ipaddress.ip_network(str(n), strict=False) for n in v or ())

    def port_refused(self, port: int) -> str | None:
        if port in self.ports:
            return f"port {port} is one of {self.label}'s ports, never reachable from a sandbox"
        return None

    def refused(self, ip: IPAddress, port: int) -> str | None:
        """Why `ip:port` is behind the fence, or None."""
        for a in dict.fromkeys((unwrap(ip), ip)):
            if any(a.version == n.version and a in n for n in self.networks):
                return f"{ip} is a node of {self.label}, never reachable from a sandbox"
        return self.port_refused(port)


NO_FENCE = Fence()
