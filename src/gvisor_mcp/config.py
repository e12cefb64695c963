"""What `gvisor-mcp serve` is configured with: frozen records the CLI fills from flags.

`ServeConfig` holds everything the operator chose on the command line (the
policy is a file it names, loaded at start-up); `HttpOptions` the HTTP
transport's part. Nothing here starts anything: `startup.py` checks and
starts, `stdio.py`/`http.py` serve. Tests and embedders build these directly.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .audit import DEFAULT_KEEP as DEFAULT_AUDIT_KEEP
from .audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from .network import NetworkConfig
from .oauth import OAuthOptions
from .paths import default_state_dir
from .sandbox import ManagerConfig


class HttpOptions(BaseModel):
    """`serve --transport http`: where to listen, TLS, edge limits, session caps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8765
    tokens_path: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    behind_tls_proxy: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    """A request head must arrive within this (also: how long a kept-alive connection may idle)."""
    max_connections: int = 512
    """Connections open at once; more wait in the kernel's listen backlog."""
    session_idle_timeout: float = 1800.0
    max_sessions: int = 256
    max_sessions_per_tenant: int = 16
    oauth: OAuthOptions | None = None
    """OAuth 2.1 resource-server mode (JWT access tokens), with --oauth-issuer."""

    def check(self) -> None:
        """Refuse configurations that would expose tokens in clear text."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if not is_loopback(self.host) and not self.tls_cert and not self.behind_tls_proxy:
            raise ValueError(
                f"refusing to listen on {self.host} without TLS: bearer tokens would cross the network "
                "in clear text. Pass --tls-cert/--tls-key, or --behind-tls-proxy when a proxy in front "
                "terminates TLS, or bind to 127.0.0.1"
            )
        for name in ("header_timeout", "body_timeout", "session_idle_timeout"):
            if not 0 < getattr(self, name) <= 86400:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 86400 seconds")
        for name in ("max_connections", "max_sessions", "max_sessions_per_tenant"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.tokens_path:
            raise ValueError(
                "--tokens FILE is required with --transport http (create it with `gvisor-mcp token add TENANT`)"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfig(BaseModel):
    """One `serve` process's configuration (the policy file is loaded at start-up)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    transport: Literal["stdio", "http"] = "stdio"
    tenant: str = "default"
    """stdio: the policy tenant this process serves (HTTP: tenants come from tokens)."""
    policy_path: str | None = None
    state_dir: Path = Field(default_factory=default_state_dir)
    manager: ManagerConfig = ManagerConfig()
    """The Manager's configuration (runsc, roots, cgroup parent, capacity)."""
    pool_size: int = 2
    """Sandboxes kept booted for the tenant's default request shape (0: none)."""
    metrics_port: int = 0
    """stdio: also serve Prometheus /metrics on 127.0.0.1:PORT (0: no)."""
    workspace: str | None = None
    """stdio, scope session: `--workspace NAME`, the named workspace this process
    uses (kept across restarts); None: roots.DEFAULT_WORKSPACE."""
    project_dir: str | None = None
    """stdio: `--project DIR`, as given; start-up checks it against the policy
    and fills `projects`."""
    projects: dict[str, Any] = Field(default_factory=dict)
    """Projects the operator gave on the command line, by name (policy.Project),
    once checked against the tenant's policy (roots.stdio_places)."""
    max_workspaces: int = 128
    """Workspace images this process keeps mounted at once, all tenants (one loop device each)."""
    max_workspaces_per_tenant: int = 16
    network: NetworkConfig = NetworkConfig()
    """network=sandbox: per-run namespaces and the egress proxy (--egress-host, --no-system-dns)."""
    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    audit_keep: int = DEFAULT_AUDIT_KEEP
    """audit.jsonl is rotated past audit_max_bytes; audit_keep old files stay."""
    http: HttpOptions | None = None
    """Set with --transport http."""
    backend: Literal["local", "ray"] = "local"
    """Where commands run: this host's Manager, or HostAgents on a Ray cluster
    (`--backend ray`, docs/scale-out.md; nothing runs on this host then)."""
    ray_address: str | None = None
    """ray: the head node's GCS address HOST:PORT (`--ray-address`)."""
    expect_runsc_version: str | None = None
    """ray: the `runsc --version` line every agent must report; None at start-up:
    this host's runsc (`--expect-runsc-version`)."""

    @property
    def multi_tenant(self) -> bool:
        """HTTP: one process serves every tenant; admission keeps a slot for a
        tenant below its fair share (jobs.FairGate)."""
        return self.transport == "http"

    @property
    def workspace_root(self) -> Path:
        return self.state_dir / "workspaces"


__all__ = ["HttpOptions", "ServeConfig", "is_loopback"]
