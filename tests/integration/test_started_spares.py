"""Started spares (sandbox/spares.py, Host.start_spare; issue 18): a cold run
of the common shape takes a bundle whose cgroup leaf, output files and
`runsc run` launcher were made before it was asked for, the launcher already
joined to the leaf and waiting for its go line.

What must hold: the run takes the spare's id and a new spare replaces it;
stdin is the caller's, or /dev/null as before; a spare whose launcher died
is never used; a Manager that closes, or dies, leaves nothing (a dead
owner's launchers exit by themselves, and the reaper counts spares apart
from containers). Limits, OOM vs kill and peak memory on this path:
test_cgroup_join.py (its `spare` variant).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Manager, ResourceSpec
from gvisor_mcp.sandbox import spares as spares_mod
from gvisor_mcp.sandbox.container import mountpoints_of, spare_shape

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import make_config

pytestmark = pytest.mark.runsc

TRUE = ContainerOptions(command=["true"])


def launchers(m: Manager) -> dict[str, int]:
    """Spare id -> pid of its waiting launcher (a /bin/sh whose argv ends with runsc's)."""
    ids = m._entered.host.spares.names()
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for cid in ids:
                if args[0] == b"/bin/sh" and cid.encode() in args:
                    out[cid] = int(entry)
    return out


async def spares_ready(m: Manager, options: ContainerOptions = TRUE) -> set[str]:
    """Wait until the Manager holds PER_KEY started spares for `options`' key."""
    host = m._entered.host
    key = (mountpoints_of(options), spare_shape(host, options))
    with anyio.fail_after(60):
        while host.spares.wanted(*key) or len(launchers(m)) < spares_mod.PER_KEY:
            await anyio.sleep(0.05)
    return host.spares.names()


async def test_a_cold_run_takes_a_started_spare_which_is_replaced(sandbox_base):
    async with Manager(make_config(sandbox_base)) as m:
        first = await m.run(TRUE)
        assert first.exit_code == 0, first.summary()
        ready = await spares_ready(m)
        assert first.container_id not in ready
        # Each waiting launcher is already in its own leaf (memory, cpu, pids).
        for cid, pid in launchers(m).items():
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            assert f":/{CGROUP_PARENT}/{cid}\n" in cgroups, cgroups
        # stdin given: the command reads it through the launcher's pipe.
        r = await m.run(ContainerOptions(command=["sh", "-c", "cat; echo out; echo err >&2; exit 3"], stdin=b"in\n"))
        assert (r.exit_code, r.stdout, r.stderr, r.warm) == (3, b"in\nout\n", b"err\n", False), r.summary()
        assert r.container_id in ready and r.boot_duration < r.duration
        # No stdin: /dev/null, as a run that starts its own launcher gets.
        r2 = await m.run(ContainerOptions(command=["sh", "-c", "stat -L -c %F /dev/stdin; cat | wc -c"]))
        assert r2.stdout == b"character special file\n0\n", r2.summary()
        assert r2.container_id in ready and r2.container_id != r.container_id
        # Both were replaced (after their answers), by spares of new ids.
        again = await spares_ready(m)
        assert not again & {r.container_id, r2.container_id}
    assert leftovers(sandbox_base) == {}


async def test_limits_other_than_the_defaults_are_written_before_go(sandbox_base):
    """A spare's leaf is made with the Manager's default limits; a run with
    its own gets them before runsc starts (an OOM at 64 MiB, not 512)."""
    async with Manager(make_config(sandbox_base)) as m:
        await m.run(TRUE)
        ready = await spares_ready(m)
        r = await m.run(
            ContainerOptions(
                command=["python3", "-c", "x = bytearray(200 << 20)"],
                resources=ResourceSpec(memory_mb=64, timeout=60),
            )
        )
        assert r.container_id in ready
        assert r.status is ContainerStatus.OOM_KILLED and r.oom_killed, r.summary()
        assert r.peak_memory_bytes <= 64 * 1024 * 1024 * 1.01
    assert leftovers(sandbox_base) == {}


async def test_a_spare_whose_launcher_died_is_never_used(sandbox_base):
    async with Manager(make_config(sandbox_base)) as m:
        await m.run(TRUE)
        await spares_ready(m)
        dead = launchers(m)
        for pid in dead.values():
            os.kill(pid, signal.SIGKILL)
        spares = m._entered.host.spares._ready  # their launchers are reaped by asyncio's watcher
        with anyio.fail_after(30):
            while any(s.started.waiting for ss in spares.values() for s in ss):
                await anyio.sleep(0.05)
        r = await m.run(ContainerOptions(command=["echo", "fine"]))
        assert (r.exit_code, r.stdout) == (0, b"fine\n"), r.summary()
        assert r.container_id not in dead
    assert leftovers(sandbox_base) == {}


CHILD = textwrap.dedent(
    """
    import json, sys, anyio
    from gvisor_mcp.sandbox import Manager, ManagerConfig, ContainerOptions
    cfg = ManagerConfig(**json.loads(sys.argv[1]))
    async def main():
        async with Manager(cfg) as m:
            await m.run(ContainerOptions(command=["true"]))
            host = m._entered.host
            while host.spares.wanted(("/",), "none") or m._tearing:  # spares made, the run torn down
                await anyio.sleep(0.05)
            print("SPARES", *sorted(host.spares.names()), flush=True)
            await anyio.sleep(600)
    anyio.run(main)
    """
)


async def test_a_dead_owners_started_spares_go_and_are_not_counted_as_containers(sandbox_base):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(make_config(sandbox_base).model_dump(mode="json"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = ""
        while not line.startswith("SPARES"):  # structlog may print its lines here too
            line = child.stdout.readline()
            assert line, "the child ended before it had its spares"
        ids = line.split()[1:]
        assert len(ids) == spares_mod.PER_KEY, ids
        child.send_signal(signal.SIGKILL)
        child.wait()
        # Their launchers read EOF once their server's end of the pipe closed.
        deadline = time.monotonic() + 30
        while "(process" in str(leftovers(sandbox_base)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = leftovers(sandbox_base)
        assert "process" not in str(left.get("spare bundles")), left
        assert any("(cgroup memory)" in s for s in left.get("spare bundles", [])), left
        async with Manager(make_config(sandbox_base)) as m:
            report = await m.reap_stale()
            assert report == []  # spares are not containers
            assert not [s for s in leftovers(sandbox_base).get("spare bundles", []) if s.split()[0][7:] in ids]
    finally:
        child.kill()
    assert leftovers(sandbox_base) == {}
