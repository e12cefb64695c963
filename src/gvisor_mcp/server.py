"""The MCP server: one `SafeServer` whose tools publish one tenant's policy.

Only builds it. The transports own their serve loops and lifespans: stdio.py
starts the runtime and serves one tenant for the process; http.py starts one
runtime and builds one server per tenant on its first request. The lifespan
yields that tenant's `runtime.TenantState`, which every tool receives as its
typed context (tools/context.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from mcp.server.mcpserver import MCPServer

from .config import ServeConfig
from .runtime import PolicyHolder, TenantState
from .tools import register_tools
from .tools.boundary import SafeServer
from .tools.files import file_facts
from .tools.view import schema_facts

SERVER_NAME = "gvisor-mcp"

Lifespan = Callable[[MCPServer[TenantState]], AbstractAsyncContextManager[TenantState]]
"""Yields the tenant's state for as long as the server serves."""


def build_server(
    config: ServeConfig,
    policy: PolicyHolder,
    tenant: str,
    lifespan: Lifespan,
    *,
    over_http: bool = False,
) -> SafeServer:
    """An MCPServer whose tools publish `tenant`'s policy in their schemas.

    `over_http`: under scope session, agents may create workspaces
    (roots.py: protocol 2026-07-28 has no sessions).
    """
    server = SafeServer(
        name=SERVER_NAME,  # version, capabilities and instructions: tools/metadata.py
        lifespan=lifespan,
        log_level="WARNING",
    )
    effective = policy.current.tenant(tenant)
    ws = effective.workspace
    agent_workspaces = over_http and ws.enabled and ws.scope == "session"
    register_tools(server, schema_facts(effective), file_facts(effective, config.projects, agent_workspaces))
    return server
