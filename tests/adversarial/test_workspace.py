"""Workspace images through the server: their life across restarts, SIGKILL
and a second server on the same state directory.

(The size limit itself, seen from inside a sandbox, is in test_resources.py;
the host-side mechanics in tests/integration/test_workspace_images.py. A
SIGKILLed server's containers, cgroups and results: tests/protocol/test_lifecycle.py.)
"""

from __future__ import annotations

import os

import anyio
import pytest

from gvisor_mcp import mountns

from ..conftest import leftovers, workspace_leftovers
from ..protocol.test_lifecycle import serve_argv, start, wait_exit
from .conftest import canary, mounts_under, ok, server_pids, write_policy

pytestmark = pytest.mark.runsc


async def stop(server) -> None:
    await server.process.stdin.aclose()
    await wait_exit(server)


@pytest.mark.parametrize("scope", ["session", "tenant"])
async def test_a_sigkilled_servers_workspace_mount_goes_with_it_and_the_next_start_cleans_its_files(
    sandbox_base, tmp_path, scope
):
    """The server mounts workspaces in a mount namespace of its own
    (mountns.py), with auto-clearing loop devices: the host never sees the
    mount, and when the server is SIGKILLed the kernel drops mount and loop
    device by itself. The next start removes the dead session's image."""
    policy = write_policy(tmp_path, f"version: 1\nworkspace: {{scope: {scope}, size: 16MiB}}\n")
    state = tmp_path / "state"
    workspaces = state / "workspaces"
    server = await start(sandbox_base, state, "--policy", str(policy), "--pool-size", "0")
    r = await server.call("execute_command", {"command": "echo kept > /workspace/note && echo ok"})
    assert r["stdout"] == "ok\n"
    [mounted] = mounts_under(workspaces, pid=server.process.pid)
    assert mounts_under(workspaces) == []  # not in the host's mount namespace
    assert len(workspace_leftovers(workspaces, wait=0)) == 1  # its loop device
    server.process.kill()
    await wait_exit(server)
    assert workspace_leftovers(workspaces) == []  # the kernel took mount and loop device down

    server = await start(sandbox_base, state, "--policy", str(policy), "--pool-size", "0")
    try:
        r = await server.call("execute_command", {"command": "cat /workspace/note; ls -A /workspace"})
        # Both are kept over stdio: the tenant's shared one, and (scope session)
        # the named workspace (`--workspace`, default `default`): the files survive the crash.
        assert r["stdout"] == "kept\nnote\n"
        kept = "shared" if scope == "tenant" else "named/default"
        assert [
            str(p.relative_to(workspaces / ".images" / "default"))
            for p in (workspaces / ".images" / "default").rglob("*.img")
        ] == [kept + ".img"]
    finally:
        await stop(server)
    assert workspace_leftovers(workspaces) == []
    assert leftovers(sandbox_base) == {}


async def test_two_servers_share_a_tenant_workspace_and_the_last_one_unmounts(serve, sandbox_base, tmp_path):
    """Two servers of one state directory share one mount namespace (the
    second joins the first's), so one tenant image is mounted once — two
    ext4 mounts of one image would corrupt it."""
    policy = write_policy(tmp_path, "version: 1\nworkspace: {scope: tenant, size: 16MiB}\n")
    workspaces = sandbox_base / "state" / "workspaces"
    async with serve("--policy", str(policy), "--pool-size", "0") as first:
        await ok(first, "echo one > /workspace/one")
        [pid1] = server_pids(sandbox_base)
        async with serve("--policy", str(policy), "--pool-size", "0") as second:
            s = await ok(second, "cat /workspace/one && echo two > /workspace/two")
            assert s["stdout"] == "one\n"
            [pid2] = [p for p in server_pids(sandbox_base) if p != pid1]
            assert mountns.namespace_id(pid1) == mountns.namespace_id(pid2) != mountns.namespace_id()
            assert len(mounts_under(workspaces, pid=pid1)) == 1  # reused, never mounted twice
            assert len(workspace_leftovers(workspaces, wait=0)) == 1  # one loop device
        # The second server stopped; the first still uses it.
        assert len(mounts_under(workspaces, pid=pid1)) == 1
        s = await ok(first, "cat /workspace/two")
        assert s["stdout"] == "two\n"
        await canary(first)
    assert workspace_leftovers(workspaces) == []  # the last one out unmounted it (the fixture checks too)


async def test_serve_refuses_a_workspace_it_cannot_bound(sandbox_base, tmp_path):
    """Without mkfs.ext4 (here: a PATH without the sbin directories) a policy
    with a workspace is refused at start, with what to do; never served as an
    unbounded directory. A policy without a workspace still starts."""
    path = "/usr/local/bin:/usr/bin:/bin"
    if any(os.access(os.path.join(d, "mkfs.ext4"), os.X_OK) for d in path.split(":")):
        pytest.skip("mkfs.ext4 is in /usr/bin here: cannot hide it")
    r = await anyio.run_process(
        serve_argv(sandbox_base, tmp_path / "state"),
        check=False,
        env={"PATH": path},
    )
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    assert "workspace" in err and "mkfs.ext4" in err and "enabled: false" in err, err
    assert not (tmp_path / "state" / "workspaces").exists()
    policy = write_policy(tmp_path, "version: 1\nworkspace: {enabled: false}\n")
    server = await start(sandbox_base, tmp_path / "state2", "--policy", str(policy), "--pool-size", "0")
    try:
        r = await server.call("execute_command", {"command": "echo ok"})
        assert r["stdout"] == "ok\n"
    finally:
        await stop(server)
    assert leftovers(sandbox_base) == {}


async def test_a_tenant_named_sessions_keeps_its_workspace_across_restarts(serve, tmp_path):
    """Session workspaces used to be recognised by their parent directory's
    name, so the shared workspace of a tenant called `sessions`
    (`<root>/sessions/shared`) was deleted as if it were a session's."""
    policy = write_policy(tmp_path, "version: 1\nworkspace: {scope: tenant, size: 16MiB}\ntenants:\n  sessions: {}\n")
    state = tmp_path / "state"
    async with serve("--policy", str(policy), "--tenant", "sessions", "--pool-size", "0", state_dir=state) as c:
        await ok(c, "echo kept > /workspace/note")
    async with serve("--policy", str(policy), "--tenant", "sessions", "--pool-size", "0", state_dir=state) as c:
        s = await ok(c, "cat /workspace/note")
        assert s["stdout"] == "kept\n"
