"""The tools' context, typed through the SDK's generics.

Every server this project builds has a lifespan that yields the caller's
`runtime.TenantState`, so `ctx.request_context.lifespan_context` is one
(not `Any`) in every tool and resource handler.
"""

from __future__ import annotations

from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context

from ..runtime import TenantState

ToolContext = Context[TenantState, Any]
"""What a tool function receives (the SDK injects it by this annotation)."""

RequestContext = ServerRequestContext[TenantState, Any]
"""What a lowlevel handler (the workspace resources) receives."""

__all__ = ["RequestContext", "TenantState", "ToolContext"]
