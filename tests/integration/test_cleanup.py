"""cleanup_stale after a crash, and never across live Managers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import anyio
import pytest

from gvisor_mcp.sandbox import ContainerOptions, Manager

from ..conftest import leftovers
from .conftest import make_config

pytestmark = pytest.mark.runsc

CHILD = textwrap.dedent(
    """
    import json, sys, anyio
    from gvisor_mcp.sandbox import Manager, ManagerConfig, ContainerOptions
    cfg = ManagerConfig(**json.loads(sys.argv[1]))
    async def main():
        async with Manager(cfg) as m, anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(m.run, ContainerOptions(command=["sleep", "300"]))
            while m.active_containers() < 2:
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)   # both sandboxes booted
            print("RUNNING", flush=True)
            await anyio.sleep(600)
    anyio.run(main)
    """
)


def owner(name: str) -> str:
    """The owner instance of a bundle or spare bundle name."""
    return name.removeprefix(".spare-").removeprefix("gm-").split("-")[0]


def _start_child(base) -> subprocess.Popen:
    cfg = make_config(base).model_dump(mode="json")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def test_cleanup_after_sigkill_removes_everything(sandbox_base):
    child = _start_child(sandbox_base)
    try:
        assert child.stdout.readline().strip() == "RUNNING"
        child.send_signal(signal.SIGKILL)
        child.wait()
        left = leftovers(sandbox_base)
        assert left.get("bundles") and left.get("cgroups"), left  # the crash left things
        async with Manager(make_config(sandbox_base)) as m:
            report = await m.reap_stale()
        assert len(report) == 2
        assert all(r["bundle"] and r["cgroups"] >= 3 for r in report), report
        # runsc's own processes may take a moment to exit after SIGKILL.
        for _ in range(50):
            if leftovers(sandbox_base) == {}:
                break
            time.sleep(0.1)
        assert leftovers(sandbox_base) == {}
    finally:
        child.kill()


async def test_cleanup_never_touches_a_live_managers_runs(sandbox_base):
    child = _start_child(sandbox_base)
    try:
        assert child.stdout.readline().strip() == "RUNNING"
        async with Manager(make_config(sandbox_base)) as m:
            assert await m.cleanup_stale() == 0
            # Its own run in flight is not stale either.
            async with anyio.create_task_group() as tg:
                tg.start_soon(m.run, ContainerOptions(command=["sleep", "2"]))
                while m.active_containers() == 0:
                    await anyio.sleep(0.05)
                await anyio.sleep(0.5)
                assert await m.cleanup_stale() == 0
            left = leftovers(sandbox_base)
            # The other process's two runs (ours may still be tearing down
            # in the background: a run is answered before its teardown)...
            assert len([n for n in left.get("bundles", []) if owner(n) != m.instance]) == 2
            # ...and its spare roots (sandbox/spares.py).
            assert [n for n in left.get("spare bundles", []) if owner(n) != m.instance]
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert await m.cleanup_stale() == 2
    finally:
        child.kill()
    for _ in range(50):
        if leftovers(sandbox_base) == {}:
            break
        time.sleep(0.1)
    assert leftovers(sandbox_base) == {}
