"""Shutdown under any signal sequence leaves nothing behind (issue 14, finding 9).

Claude Code ends a stdio server with SIGINT and, 100 ms later, SIGTERM. The
server used to die of that SIGTERM half-way through its clean-up, leaving
the session workspace mounted and its loop device attached. Here that exact
pattern (and other mixes with SIGHUP and a closed stdin) hits the server at
each moment of its life, and after each: exit status 0, and no container,
runsc state, bundle, cgroup, runsc process, workspace mount or loop device.
The last test drives the real `claude mcp list`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import pytest

from ..adversarial.conftest import server_pids
from ..conftest import CGROUP_PARENT, leftovers, workspace_leftovers
from .conftest import BIN
from .test_lifecycle import RawServer, serve_argv, until_running, wait_exit

pytestmark = pytest.mark.runsc

REPO = Path(__file__).resolve().parents[2]
CLAUDE = Path(os.environ.get("GVISOR_MCP_CLAUDE", REPO / ".cache" / "claude-code" / "node_modules" / ".bin" / "claude"))

POLICY = "version: 1\nworkspace: {scope: session, size: 16MiB}\n"


async def spawn(base: Path, state: Path, log: Path, *extra: str) -> RawServer:
    policy = state.parent / "policy.yaml"
    policy.write_text(POLICY)
    process = await anyio.open_process(
        serve_argv(base, state, "--policy", str(policy), *extra),
        stderr=log.open("wb"),
        env={"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "INFO"},
    )
    return RawServer(process)


async def logged(log: Path, event: str) -> None:
    """Wait until the server's structured log has `event`."""
    with anyio.fail_after(90):
        while True:
            for line in log.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line).get("event") == event:
                        return
                except ValueError:
                    continue
            await anyio.sleep(0.02)


def send(server: RawServer, sig: signal.Signals) -> None:
    if server.process.returncode is None:
        try:
            server.process.send_signal(sig)
        except ProcessLookupError:
            pass  # it already exited (only possible before its handlers exist)


async def sigint_then_sigterm(server: RawServer) -> None:
    send(server, signal.SIGINT)
    await anyio.sleep(0.1)
    send(server, signal.SIGTERM)


async def assert_nothing_left(server: RawServer, base: Path, state: Path, log: Path, *, rc: tuple = (0,)) -> None:
    status = await wait_exit(server, 90)
    assert status in rc, log.read_text()[-3000:]
    assert leftovers(base) == {}
    assert workspace_leftovers(base, state) == []
    sessions = state / "workspaces" / "default" / "sessions"
    assert not sessions.exists() or list(sessions.iterdir()) == []  # the session's image and directory went


MOMENTS = ["before handlers", "start-up", "canary", "pool boot", "after initialize", "mid-call", "mid-shutdown"]


@pytest.mark.parametrize("moment", MOMENTS)
async def test_sigint_then_sigterm_100ms_later_leaves_nothing_at_any_moment(sandbox_base, tmp_path, moment):
    state = tmp_path / "state"
    log = tmp_path / "server.log"
    server = await spawn(sandbox_base, state, log)
    if moment == "before handlers":
        # Python is still importing: the default action ends it, nothing exists yet.
        await sigint_then_sigterm(server)
        await assert_nothing_left(server, sandbox_base, state, log, rc=(0, -signal.SIGINT, -signal.SIGTERM))
        return
    if moment == "start-up":
        await logged(log, "serve_begin")  # handlers installed: policy, mount namespace, canary next
    elif moment == "canary":
        await logged(log, "mount_namespace")  # logged right before the canary starts
    elif moment == "pool boot":
        await logged(log, "server_start")  # the warm pool starts booting now
    else:
        with anyio.fail_after(90):
            await server.initialize()
        if moment == "mid-call":
            await server.call("execute_command", {"command": "sleep 600", "background": True})
            await until_running(server, 1)
            await server.send(
                {
                    "jsonrpc": "2.0",
                    "id": 99,
                    "method": "tools/call",
                    "params": {"name": "execute_command", "arguments": {"command": "sleep 30"}},
                }
            )
            await anyio.sleep(0.5)
        elif moment == "mid-shutdown":
            await server.process.stdin.aclose()  # type: ignore[union-attr]
            await logged(log, "stdin_closed")
    await sigint_then_sigterm(server)
    if moment == "mid-shutdown":
        send(server, signal.SIGHUP)
        send(server, signal.SIGINT)
    await assert_nothing_left(server, sandbox_base, state, log)


@pytest.mark.parametrize(
    "signals",
    [
        ["SIGTERM", "SIGTERM", "SIGINT"],
        ["SIGHUP", "SIGINT", "SIGHUP", "SIGTERM"],
        ["SIGINT", "stdin closed", "SIGTERM"],
    ],
)
async def test_a_burst_of_mixed_signals_right_after_initialize_leaves_nothing(sandbox_base, tmp_path, signals):
    state = tmp_path / "state"
    log = tmp_path / "server.log"
    server = await spawn(sandbox_base, state, log)
    with anyio.fail_after(90):
        await server.initialize()
    for name in signals:
        if name == "stdin closed":
            await server.process.stdin.aclose()  # type: ignore[union-attr]
        else:
            server.process.send_signal(getattr(signal, name))
        await anyio.sleep(0.03)
    await assert_nothing_left(server, sandbox_base, state, log)


def claude_env(home: Path) -> dict[str, str]:
    """A throw-away HOME: claude never reads or writes the real user's config."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
    }


async def test_claude_mcp_list_leaves_nothing_behind(sandbox_base, tmp_path):
    """`claude mcp list` starts the server, initializes, then ends it with
    SIGINT and SIGTERM 100 ms later. Each run used to leak a mount and a loop
    device, until the loop devices ran out."""
    assert CLAUDE.exists(), f"{CLAUDE} is missing: scripts/setup.sh installs Claude Code (npm) for this test"
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "state"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = claude_env(home)
    add = await anyio.run_process(
        [
            str(CLAUDE),
            "mcp",
            "add",
            "--scope",
            "user",
            "gvisor",
            "--",
            str(BIN),
            "serve",
            "--state-root",
            str(sandbox_base),
            "--cgroup-parent",
            CGROUP_PARENT,
            "--state-dir",
            str(state),
            "--policy",
            str(policy),
        ],
        env=env,
        cwd=home,
        check=False,
    )
    assert add.returncode == 0, (add.stderr + add.stdout).decode()
    assert str(BIN) in "".join(p.read_text() for p in home.rglob("*.json"))  # its config is in our HOME
    for _ in range(3):
        with anyio.fail_after(180):
            listed = await anyio.run_process([str(CLAUDE), "mcp", "list"], env=env, cwd=home, check=False)
        out = listed.stdout.decode()
        assert "gvisor" in out and "Connected" in out, out + listed.stderr.decode()
        with anyio.fail_after(90):
            while server_pids(sandbox_base):  # claude does not wait for the server to exit
                await anyio.sleep(0.1)
        assert leftovers(sandbox_base) == {}
        assert workspace_leftovers(sandbox_base, state) == []
