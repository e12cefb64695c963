"""Can this host run sandboxes? The host checks and the canary run.

`gvisor-mcp doctor` prints every check; `serve` refuses to start when the
canary fails (commands are never run outside gVisor).
"""

from __future__ import annotations

import os
import re
import shutil

from pydantic import BaseModel, ConfigDict

from .cgroups import detect_version
from .config import ManagerConfig
from .manager import Manager
from .options import ContainerOptions, ResourceSpec
from .result import ContainerStatus
from .runsc import Runsc, missing_launcher_tools

OLDEST_RUNSC = "20240101"
"""Older releases (Debian 12's own, 2022) cannot run `ls -l /`: see CANARY."""

CANARY = ("/bin/sh", "-c", "ls -l / >/dev/null && echo ok")
"""Debian 12's own runsc (2022) fails `ls -l /` with EINVAL (statx): this
catches it, and anything else that keeps a sandbox from running a command."""


class Check(BaseModel):
    """One line of the doctor's report."""

    model_config = ConfigDict(frozen=True)

    name: str
    ok: bool
    detail: str


async def host_checks(config: ManagerConfig) -> list[Check]:
    """Root, runsc and its age, platform, cgroups: what needs no sandbox."""
    root = os.geteuid() == 0
    checks = [Check(name="root", ok=root, detail="yes" if root else "run as root (runsc and cgroups need it)")]
    path = shutil.which(config.runsc_path)
    checks.append(
        Check(
            name="runsc", ok=path is not None, detail=path or f"{config.runsc_path!r} not found: run scripts/setup.sh"
        )
    )
    if path:
        version = await Runsc(path, config.runsc_root, config.platform).version() or "?"
        m = re.search(r"(20\d{6})", version)
        good = bool(m and m.group(1) >= OLDEST_RUNSC)
        checks.append(
            Check(
                name="runsc version",
                ok=good,
                detail=version
                + (
                    "" if good else " (too old: Debian 12's own runsc cannot run `ls`; install from bookworm-backports)"
                ),
            )
        )
    checks.append(Check(name="platform", ok=True, detail=config.platform))
    needed = config.cgroup_prejoin and config.report_memory_limit
    missing = missing_launcher_tools() if needed else []
    checks.append(
        Check(
            name="launcher (unshare, mount)",
            ok=not missing,
            detail="not needed (cgroup_prejoin or report_memory_limit off)"
            if not needed
            else ("found" if not missing else f"missing: {', '.join(missing)} (packages util-linux, mount)"),
        )
    )
    cg = detect_version()
    checks.append(
        Check(
            name="cgroups",
            ok=cg is not None,
            detail=f"v{cg}" if cg else "no memory controller: limits cannot be enforced",
        )
    )
    return checks


async def canary(manager: Manager, timeout: float = 30.0) -> tuple[bool, str]:
    """Run the canary in a sandbox; (passed, detail). Never raises."""
    try:
        r = await manager.run(ContainerOptions(command=CANARY, resources=ResourceSpec(timeout=timeout)))
    except Exception as e:  # doctor and serve report it, they do not crash
        return False, f"{type(e).__name__}: {e}"
    if r.status is ContainerStatus.EXITED and r.exit_code == 0 and r.stdout.strip() == b"ok":
        return True, f"ok in {r.duration * 1000:.0f} ms (boot {r.boot_duration * 1000:.0f} ms)"
    detail = (r.stderr or r.stdout).decode(errors="replace").strip()[:500]
    return False, f"{r.summary()}: {detail}"


async def canary_check(config: ManagerConfig) -> Check:
    """The canary in a Manager of its own. Never raises."""
    try:
        async with Manager(config) as manager:
            passed, detail = await canary(manager)
    except Exception as e:
        passed, detail = False, f"{type(e).__name__}: {e}"
    return Check(name="canary (ls -l / in a sandbox)", ok=passed, detail=detail)


async def doctor(config: ManagerConfig) -> list[Check]:
    """The host checks, then (when they all pass) the canary."""
    checks = await host_checks(config)
    if all(c.ok for c in checks):
        checks.append(await canary_check(config))
    return checks
