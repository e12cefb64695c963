"""Scale-out on Ray: one HostAgent per host, front ends as Ray drivers.

Ray is an optional extra (`pip install .[ray]`): nothing outside this
package imports it, and modules here import it only inside functions, so
`import gvisor_mcp.cluster` works without Ray installed. See
docs/scale-out.md for the architecture and the measured facts.
"""

from __future__ import annotations

NAMESPACE = "gvisor-mcp"
"""The Ray namespace agents and the coordinator are named in."""
HOST_RESOURCE_PREFIX = "gvisor_mcp_host_"
"""`<prefix><host name>`: the custom node resource that pins an agent to its node."""
AGENT_NAME_PREFIX = "gvisor-mcp-agent:"
COORDINATOR_NAME = "gvisor-mcp-coordinator"


def ray_missing() -> str | None:
    """Why Ray cannot be used here, or None (the extra is installed)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed: pip install 'gvisor-mcp[ray]' (scripts/setup.sh does)"
    return None
