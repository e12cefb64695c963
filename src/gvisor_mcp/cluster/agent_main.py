"""`gvisor-mcp agent`: this host's HostAgent, for a systemd unit on each worker node.

The process is a Ray driver that owns the agent actor (pinned to this
node by `gvisor_mcp_host_<name>`): when it stops, the actor goes with it,
and the next start reaps what was left. SIGTERM stops the agent cleanly.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("gvisor_mcp.cluster.agent")


def agent_main(args: Any, manager_config: Any) -> int:
    from .agent import AgentConfig, start_agent
    from .frontend import connect
    from .spec import ceilings

    try:
        config = AgentConfig(
            host=args.host_name,
            state_dir=Path(args.state_dir),
            manager=manager_config,
            pool_size=args.pool_size,
            ceilings=ceilings(args),
        )
        connect(args.ray_address)
    except (ValueError, ConnectionError) as e:
        print(f"gvisor-mcp: {e}", file=sys.stderr)
        return 2
    import ray

    handle, report = start_agent(config)
    log.info("agent_ready", **{k: v for k, v in report.items() if k != "ceilings"})
    if not report.get("canary_ok"):
        print(
            f"gvisor-mcp: the agent's canary failed: {report.get('canary')}; front ends will not place runs here",
            file=sys.stderr,
        )
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(1)
    try:
        ray.get(handle.stop.remote(), timeout=60)
    finally:
        ray.kill(handle)
        ray.shutdown()
    return 0
