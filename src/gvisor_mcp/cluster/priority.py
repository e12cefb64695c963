"""Undo Ray's low CPU priority for the processes on every run's path.

Ray starts its worker processes at nice 15 (`worker_niceness`, so that its
raylet and GCS keep their CPU when tasks are busy). Our agent and
coordinator are such workers, and every sandbox an agent starts inherits
its niceness: on a busy host a nice-15 sandbox gets a few percent of a core
against nice-0 work, so a warm `true` took ~3x as long in an agent as in the
single-host server (measured: docs/scale-out.md, "Where the time went").
The single-host server runs its sandboxes at the host's normal priority, and
so must an agent: it is the only thing on its host that runs them.

Linux keeps the nice value per thread, and a new thread or process inherits
its creator's: every thread of this process is reset, so the threads that
spawn runsc (the event loop, anyio's workers) and all they start run at 0.
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger("gvisor_mcp.cluster.priority")

NORMAL = 0


def normal_priority(role: str) -> int | None:
    """Set every thread of this process to nice 0; the calling thread's nice
    value after (None where it cannot be read). Lowering a nice value needs
    CAP_SYS_NICE (agents run as root for runsc); without it, say so once and
    go on at the priority Ray gave."""
    failed = None
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != NORMAL:
                os.setpriority(os.PRIO_PROCESS, tid, NORMAL)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except OSError as e:
            failed = e
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None
    if failed is not None or now != NORMAL:
        log.warning(
            "cluster_priority_not_reset",
            role=role,
            nice=now,
            error=f"{type(failed).__name__}: {failed}" if failed else None,
            hint="runs on this host are slowed by Ray's worker_niceness; run the agent as root "
            "or start the cluster with worker_niceness=0",
        )
    return now
