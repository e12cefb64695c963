"""`gvisor-mcp serve --backend ray --ray-address ADDR`: the front end as a Ray driver.

Everything above the Jobs layer is today's server (tokens, policy, quotas,
tools); `RayBackend` only swaps where a job runs (RayRunner) and where its
output is read from (ClusterResultStore). This process never runs a
sandbox: with no healthy agent, runs are refused, never run here.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import structlog

from .agent import runsc_version
from .frontend import ClusterResultStore, RayRunner, connect

log = structlog.get_logger("gvisor_mcp.cluster.serve")


class RayBackend:
    def __init__(self, address: str, expected_runsc_version: str | None) -> None:
        self.address = address
        self.expected = expected_runsc_version

    def preflight(self) -> tuple[bool, str]:
        """Join the cluster (token auth) before serving: say so when it fails."""
        try:
            connect(self.address)
        except ConnectionError as e:
            return False, str(e)
        return True, f"joined the Ray cluster at {self.address}"

    def open_store(self, state_dir: Path) -> ClusterResultStore:
        return ClusterResultStore(state_dir)

    def runner(self, settings: Any, policy: Any, store: ClusterResultStore) -> RayRunner:
        runner = RayRunner(policy, settings.state_dir / "workspaces", settings.state_dir / "cluster",
                           expected_runsc_version=self.expected, kill_grace=settings.manager.kill_grace)
        store.runner = runner
        return runner


def ray_backend(args: Any) -> RayBackend:
    if not args.ray_address:
        raise ValueError("--backend ray needs --ray-address HOST:PORT (the head node's GCS address)")
    expected = args.expect_runsc_version
    if expected is None and shutil.which(args.runsc):
        expected = runsc_version(args.runsc)
    return RayBackend(args.ray_address, expected)


def leave_cluster() -> None:
    """Disconnect the driver before the interpreter exits: left to Ray's own
    atexit hook, its core worker aborted the process (exit -6) after a clean
    SIGTERM shutdown of the server."""
    import ray

    if ray.is_initialized():
        try:
            ray.shutdown()
        except Exception as e:  # the server has stopped; say why the exit is not clean
            log.warning("ray_shutdown_failed", error=f"{type(e).__name__}: {e}")
