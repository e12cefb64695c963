"""Prometheus metrics of one server process (prometheus-client, own registry).

What an operator watches: calls by tenant and how they ended, policy and
quota denials, boot and run durations, sandboxes running now, warm pool hits,
misses, idle and frozen sandboxes, OOMs and timeouts. Labels are tenant names
and fixed enums only: never a command, a result id or a token.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

DURATION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 120, 300, 600)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "gvisor_mcp_calls",
            "execute_command calls that ran, by tenant and final status",
            ["tenant", "status"],
            registry=r,
        )
        self.denials = Counter(
            "gvisor_mcp_denials",
            "tool calls refused before running, by tenant and kind (tools/refuse.py)",
            ["tenant", "kind"],
            registry=r,
        )
        self.boot_seconds = Histogram(
            "gvisor_mcp_boot_seconds",
            "time until the sandbox ran the command (claim time when warm)",
            ["warm"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.run_seconds = Histogram(
            "gvisor_mcp_run_seconds",
            "wall time of a run, sandbox creation to teardown",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.pool = Counter(
            "gvisor_mcp_pool_claims",
            "runs by whether they claimed a warm sandbox",
            ["result"],
            registry=r,
        )
        self.ooms = Counter("gvisor_mcp_oom_kills", "runs ended by their memory limit", ["tenant"], registry=r)
        self.timeouts = Counter("gvisor_mcp_timeouts", "runs ended by their time limit", ["tenant"], registry=r)
        self.active = Gauge("gvisor_mcp_active_containers", "sandboxes running commands now", registry=r)
        self.pool_idle = Gauge("gvisor_mcp_pool_idle", "pre-booted sandboxes waiting to be claimed", registry=r)
        self.pool_frozen = Gauge(
            "gvisor_mcp_pool_frozen",
            "pre-booted sandboxes frozen (cgroup freezer) after idling --pool-freeze-after seconds",
            registry=r,
        )
        self.egress_connections = Counter(
            "gvisor_mcp_egress_connections",
            "connection attempts through the egress proxy, by tenant and verdict (allowed, denied, failed)",
            ["tenant", "verdict"],
            registry=r,
        )
        self.egress_bytes = Counter(
            "gvisor_mcp_egress_bytes",
            "bytes through the egress proxy, by tenant and direction (up, down)",
            ["tenant", "direction"],
            registry=r,
        )

    def watch(
        self, active: Callable[[], float], pool_idle: Callable[[], float], pool_frozen: Callable[[], float]
    ) -> None:
        """Gauges read live from the Manager at scrape time (nothing to keep in
        step on every path that starts, claims, freezes or thaws a sandbox)."""
        self.active.set_function(active)
        self.pool_idle.set_function(pool_idle)
        self.pool_frozen.set_function(pool_frozen)

    def egress(self, tenant: str, verdict: str, up: int, down: int) -> None:
        self.egress_connections.labels(tenant, verdict).inc()
        if up:
            self.egress_bytes.labels(tenant, "up").inc(up)
        if down:
            self.egress_bytes.labels(tenant, "down").inc(down)

    def denied(self, tenant: str, kind: str) -> None:
        self.denials.labels(tenant, kind).inc()

    def finished(
        self, tenant: str, status: str, *, warm: bool | None, boot: float | None, duration: float | None
    ) -> None:
        self.calls.labels(tenant, status).inc()
        if status == "oom_killed":
            self.ooms.labels(tenant).inc()
        elif status == "timed_out":
            self.timeouts.labels(tenant).inc()
        if warm is not None:
            self.pool.labels("hit" if warm else "miss").inc()
        if boot is not None:
            self.boot_seconds.labels(str(bool(warm)).lower()).observe(boot)
        if duration is not None:
            self.run_seconds.labels(tenant).observe(duration)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
