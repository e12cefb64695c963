"""Per-run, per-destination accounting of egress: what the agent and the audit see.

Bounded: at most MAX_DESTINATIONS distinct (destination, verdict, reason)
rows per run; connections beyond that are still counted in the totals and
in `other_connections`, so a run that tries 10,000 hosts cannot grow its
result without limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["allowed", "denied", "failed"]
MAX_DESTINATIONS = 64


@dataclass(frozen=True)
class ConnectionEvent:
    """One connection attempt through a run's proxy, when it ends."""

    run_id: str
    destination: str
    """host:port as the sandbox asked for it ([v6]:port for IPv6 literals)."""
    verdict: Verdict
    reason: str | None
    method: str
    """CONNECT, or the HTTP method of a forwarded request."""
    address: str | None = None
    """The address actually connected to (after the proxy's own resolution)."""
    bytes_up: int = 0
    bytes_down: int = 0
    duration: float = 0.0


@dataclass
class Flow:
    destination: str
    verdict: Verdict
    reason: str | None
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "destination": self.destination,
            "verdict": self.verdict,
            "connections": self.connections,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class RunAccounting:
    proxy: str
    flows: dict[tuple[str, str, str | None], Flow] = field(default_factory=dict)
    connections: int = 0
    denied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    other_connections: int = 0

    def add(self, ev: ConnectionEvent) -> None:
        self.connections += 1
        self.denied += ev.verdict == "denied"
        self.bytes_up += ev.bytes_up
        self.bytes_down += ev.bytes_down
        key = (ev.destination, ev.verdict, ev.reason)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= MAX_DESTINATIONS:
                self.other_connections += 1
                return
            flow = self.flows[key] = Flow(ev.destination, ev.verdict, ev.reason)
        flow.connections += 1
        flow.bytes_up += ev.bytes_up
        flow.bytes_down += ev.bytes_down

    def report(self) -> dict[str, Any]:
        """JSON-able; the result's `network` section."""
        return {
            "proxy": self.proxy,
            "connections": self.connections,
            "denied": self.denied,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "destinations": [f.as_dict() for f in self.flows.values()],
            "other_connections": self.other_connections,
        }
