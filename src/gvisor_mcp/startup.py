"""What `serve` does before a transport takes over, whichever transport.

In order: signals never kill the process with something to clean up
(lifecycle.py); big buffers go back to the OS; the policy is loaded and
checked against the host; workspace mounts move into a private mount
namespace (mountns.py, needs a process with no threads yet); a canary
sandbox must run (`ls -l /` inside gVisor) or nothing is served. Then the
transport's serve loop (stdio.py or http.py) runs until stdin ends or a stop
signal, and the runtime cleans up behind it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Awaitable, Callable

import anyio
import structlog

from . import logs, mountns
from . import workspace as _workspace
from .config import ServeConfig
from .images.store import ImageStore
from .lifecycle import Signals
from .policy.fairness import capacity_warnings
from .roots import stdio_places
from .runtime import PolicyHolder
from .sandbox import Manager
from .sandbox.doctor import canary

log = structlog.get_logger("gvisor_mcp.startup")

ServeLoop = Callable[[ServeConfig, PolicyHolder, Signals], Awaitable[None]]
"""A transport's serve loop: serves until done or stopped; cleans up before returning."""


def serve(config: ServeConfig, loop: ServeLoop) -> int:
    """Refuse to start unless a sandbox really works; then run `loop`. The exit code."""
    try:
        return _serve(config, loop)
    finally:
        Signals.finished()
        if config.backend == "ray":
            # Lazy: ray is an optional extra; only `serve --backend ray` imports it.
            from .cluster.serve import leave_cluster

            leave_cluster()


def _return_big_buffers_to_the_os() -> None:
    """glibc: every allocation of 1 MiB or more is its own mapping, unmapped when freed.

    By default glibc raises that threshold after the first large free (up to
    32 MiB), and from then on big transient buffers — a 30 MB request line,
    its parsed text — come from the heap and stay resident after they are
    freed: +86 MiB after one 30 MB line (issue 14, finding 10).
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def _serve(config: ServeConfig, loop: ServeLoop) -> int:
    # First of all: from here on a signal never kills the process with
    # something to clean up (lifecycle.py), and workspace mounts live in a
    # namespace the kernel tears down with us (mountns.py; needs a process
    # with no threads yet).
    signals = Signals()
    signals.install()
    _return_big_buffers_to_the_os()
    logs.ensure(os.environ.get("GVISOR_MCP_LOG_LEVEL", "INFO"))
    log.info("serve_begin", pid=os.getpid())
    try:
        if config.audit_max_bytes < 1 << 20 or config.audit_keep < 0:
            raise ValueError("--audit-max-mb must be at least 1 and --audit-keep at least 0")
        policy = PolicyHolder(config.policy_path, ImageStore(config.state_dir / "images"))
        policy.current.tenant(config.tenant)
        for warning in policy.current.warnings:
            log.warning("policy_warning", warning=str(warning))
        if config.backend == "ray":
            # Lazy: ray is an optional extra. Agents check workspaces and run canaries.
            from .cluster.serve import with_expected_runsc

            config = with_expected_runsc(config)
        else:
            _workspace.check_support(policy.current)  # never an unbounded workspace
        projects = stdio_places(config, policy.current.tenant(config.tenant))
        config = config.model_copy(update={"projects": projects})
    except Exception as e:
        print(f"gvisor-mcp: {e}", file=sys.stderr)
        return 2
    for capacity in capacity_warnings(
        policy.current,
        config.manager.max_concurrent_containers,
        None if config.multi_tenant else [config.tenant],
        shared=config.multi_tenant,
    ):
        log.warning("capacity_warning", warning=capacity)
    if config.http is not None:
        try:
            config.http.check()
        except ValueError as e:
            print(f"gvisor-mcp: {e}", file=sys.stderr)
            return 2

    namespace = mountns.enter(config.workspace_root.resolve())
    log.info("mount_namespace", namespace=namespace)

    async def preflight() -> tuple[bool, str] | None:
        async with Manager(config.manager) as manager:
            # A stop signal cancels only the canary; the Manager's exit then
            # removes its sandbox as usual.
            return await signals.guard(lambda: canary(manager))

    if config.backend == "ray":
        # Lazy: ray is an optional extra. Nothing runs on this host: join the cluster instead of a canary.
        from .cluster.serve import preflight as join_cluster

        ok, detail = join_cluster(config)
        if not ok:
            print(f"gvisor-mcp: refusing to serve: {detail} (docs/scale-out.md)", file=sys.stderr)
            return 1
        anyio.run(loop, config, policy, signals)
        return 0
    try:
        checked = anyio.run(preflight)
    except Exception as e:
        checked = False, f"{type(e).__name__}: {e}"
    if checked is None:  # stopped by a signal during the canary
        log.info("server_stop", tenant=config.tenant, before="serving")
        return 0
    ok, detail = checked
    if not ok:
        print(
            "gvisor-mcp: refusing to serve: a sandbox could not run the canary "
            f"(`ls -l /` inside gVisor): {detail}. Run `gvisor-mcp doctor`; "
            "commands are never run outside gVisor.",
            file=sys.stderr,
        )
        return 1
    anyio.run(loop, config, policy, signals)
    return 0
