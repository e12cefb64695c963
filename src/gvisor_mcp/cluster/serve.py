"""`gvisor-mcp serve --backend ray --ray-address ADDR`: the front end as a Ray driver.

Everything above the Jobs layer is today's server (tokens, policy, quotas,
tools); with `ServeConfig.backend == "ray"`, `runtime.start_runtime` swaps
where a job runs (frontend.RayRunner) and where its output is read from
(frontend.ClusterResultStore). This process never runs a sandbox: with no
healthy agent, runs are refused, never run here. `startup.serve` calls
what is here (lazily: ray is an optional extra).
"""

from __future__ import annotations

import shutil

import structlog

from ..config import ServeConfig
from .agent import runsc_version
from .frontend import connect

log = structlog.get_logger("gvisor_mcp.cluster.serve")


def with_expected_runsc(config: ServeConfig) -> ServeConfig:
    """Agents must run the runsc this front end expects: `--expect-runsc-version`,
    else this host's own runsc (when it has one)."""
    if config.expect_runsc_version is not None or not shutil.which(config.manager.runsc_path):
        return config
    return config.model_copy(update={"expect_runsc_version": runsc_version(config.manager.runsc_path)})


def preflight(config: ServeConfig) -> tuple[bool, str]:
    """Join the cluster (token auth) before serving: say so when it fails."""
    assert config.ray_address is not None  # cli.serve_config refuses --backend ray without it
    try:
        connect(config.ray_address)
    except ConnectionError as e:
        return False, str(e)
    return True, f"joined the Ray cluster at {config.ray_address}"


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
