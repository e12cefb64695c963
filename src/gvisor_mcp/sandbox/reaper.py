"""Stale-state reaping: what dead Managers left behind on this host.

A Manager that died (SIGKILL, OOM, power loss) cannot remove its sandboxes:
runsc state, runsc's own processes, cgroup leaves and bundle directories
stay. Container ids embed their owner's instance (ownership.py) and every
live Manager holds its owner lock, so a leftover is reaped only when its
owner is dead; a live neighbour's runs are never touched, nor ids that are
not ours at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import structlog

from .cgroups import list_leaves
from .errors import RunscError
from .host import Host, kill_pid
from .ownership import ID_PREFIX, instance_of
from .spares import PREFIX as SPARE_PREFIX

log = structlog.get_logger("gvisor_mcp.sandbox")


async def reap_stale(host: Host, owned: Callable[[], set[str]]) -> list[dict]:
    """Remove leftovers no live Manager owns; a report per container removed.

    `owned()` names our own containers that are in use (running, pooled,
    booting, tearing down): those of ours not in it are leftovers too.
    """
    runsc, config = host.runsc, host.config
    candidates: set[str] = set()
    try:
        candidates.update(await runsc.list_ids())
    except (RunscError, json.JSONDecodeError):
        pass
    candidates.update(runsc.ids_in_state_dir())
    candidates.update(runsc.all_run_ids(ID_PREFIX))
    candidates.update(p.name for p in host.base.iterdir() if p.name.startswith(ID_PREFIX))
    candidates.update(n for n in list_leaves(config.cgroup_parent, host.cgroup_version) if n.startswith(ID_PREFIX))
    # A started spare (spares.py) has a leaf and a launcher under its id: it
    # is reaped as a spare below, not reported as a container.
    candidates -= {p.name[len(SPARE_PREFIX) :] for p in host.base.iterdir() if p.name.startswith(SPARE_PREFIX)}
    report = []
    alive: dict[str, bool] = {}
    for cid in sorted(candidates):
        inst = instance_of(cid)
        if inst is None:
            continue  # not ours: never touch it
        if inst == host.instance and cid in owned():
            continue
        if inst != host.instance:
            if inst not in alive:
                alive[inst] = host.owner.alive(inst)
            if alive[inst]:
                continue
        report.append(await _reap(host, cid))
    await _reap_spares(host, alive)
    host.owner.forget_dead()
    if report:
        log.info("cleanup_stale", removed=len(report))
    return report


async def _reap_spares(host: Host, alive: dict[str, bool]) -> None:
    """Spare bundles (spares.py) of dead owners, and ours no longer listed,
    with a started spare's launcher (it exits by itself once its server's
    end of its stdin is closed) and cgroup leaf."""
    for p in host.base.iterdir():
        if not p.name.startswith(SPARE_PREFIX):
            continue
        cid = p.name[len(SPARE_PREFIX) :]
        inst = instance_of(cid)
        if inst is None:
            continue
        if inst == host.instance:
            if cid in host.spares.names():
                continue
        else:
            if inst not in alive:
                alive[inst] = host.owner.alive(inst)
            if alive[inst]:
                continue
        for pid in host.runsc.process_pids(cid):
            kill_pid(pid)
        await host.cgroup(cid).remove()
        shutil.rmtree(p, ignore_errors=True)


def describe(entry: dict) -> str:
    """One line per reaped container (`gvisor-mcp cleanup` prints these)."""
    return (
        f"removed {entry['container_id']}: processes={entry['processes']} "
        f"runsc_state={entry['runsc_state']} cgroups={entry['cgroups']} bundle={entry['bundle']}"
    )


async def _reap(host: Host, cid: str) -> dict:
    runsc = host.runsc
    removed: dict = {"container_id": cid}
    pids = runsc.process_pids(cid)
    had_state = runsc.has_state(cid)
    cg = host.cgroup(cid)
    try:
        # A pooled sandbox the dead server froze (pool.py): frozen, its
        # sentry answers no `runsc kill`, and its tasks do not die of
        # SIGKILL until thawed. Harmless on a leaf that is not frozen.
        cg.thaw()
    except OSError:
        pass  # no freezer leaf: it was never frozen
    if had_state:
        await runsc.kill(cid)
        await runsc.delete(cid)
        runsc.remove_state_files(cid)
    for pid in runsc.process_pids(cid):
        kill_pid(pid)
    removed["processes"] = len(pids)
    removed["runsc_state"] = had_state
    dirs = cg.existing_dirs()
    left = await cg.remove()
    removed["cgroups"] = len(dirs) - len(left)
    bundle = host.base / cid
    removed["bundle"] = bundle.exists()
    shutil.rmtree(bundle, ignore_errors=True)
    return removed
