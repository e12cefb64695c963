"""Adversarial tests: hostile requests through the real `gvisor-mcp serve` over stdio.

Every test talks to the real server (real runsc underneath) through the SDK's
stdio client, asserts the safe outcome, that the server still answers a
normal call afterwards (`canary`), and — in the `serve` fixture's teardown —
that nothing is left behind: no container, runsc state, bundle, cgroup,
runsc process, nor workspace mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import uuid
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from gvisor_mcp import workspace

from ..conftest import CGROUP_PARENT, leftovers, workspace_leftovers
from ..protocol.conftest import BIN, run, server_params, structured, text  # noqa: F401 (re-exported)

CANARY_SECONDS = 60
"""A generous bound for a normal call: the server must still answer, not be fast."""


async def ok(client, command: str, **args) -> dict:
    """Run a command that must succeed; its structured result."""
    r = await run(client, command=command, **args)
    assert not r.is_error, text(r)
    s = structured(r)
    assert s["status"] == "exited" and s["exit_code"] == 0, s
    return s


async def canary(client) -> None:
    """The server still answers a normal call after whatever came before."""
    with anyio.fail_after(CANARY_SECONDS):
        r = await run(client, command="echo ok")
    assert not r.is_error, text(r)
    s = structured(r)
    assert (s["status"], s["exit_code"], s["stdout"]) == ("exited", 0, "ok\n"), s


def write_policy(directory: Path, body: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(body)
    return path


def mounts_under(*directories: Path, pid: int | str = "self") -> list[str]:
    """Loop mounts (workspace images) whose mountpoint is under any of
    `directories`, in the mount namespace of `pid` (a server's: its
    workspaces are mounted in a namespace of its own, see mountns.py)."""
    dirs = [d.resolve() for d in directories if d.exists()]
    return sorted(str(mp) for mp, _ in workspace.loop_mounts(pid) if any(d == mp or d in mp.parents for d in dirs))


def server_pids(base: Path) -> list[int]:
    """Pids of `gvisor-mcp serve` processes running on `base` (the SDK hides them)."""
    needle = str(base).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and needle in argv and any(a.endswith(b"gvisor-mcp") for a in argv[:2]):
            pids.append(int(entry))
    return pids


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> int:
    """'123456 kB' -> bytes."""
    return int(value.split()[0]) * 1024


def audit(state: Path) -> list[dict]:
    path = state / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def cgroup_file(container_id: str, controller: str, name: str) -> Path:
    """A file of a container's host cgroup leaf, v1 or v2."""
    v2 = Path("/sys/fs/cgroup") / CGROUP_PARENT / container_id / name
    if v2.exists():
        return v2
    return Path("/sys/fs/cgroup") / controller / CGROUP_PARENT / container_id / name


async def running_container(client, result_id: str) -> str:
    """Wait until a background command is inside its sandbox; its container id."""
    with anyio.fail_after(CANARY_SECONDS):
        while True:
            active = structured(await client.call_tool("list_active", {}))["commands"]
            mine = [a for a in active if a["result_id"] == result_id]
            if mine and mine[0]["container_id"]:
                return mine[0]["container_id"]
            await anyio.sleep(0.1)


async def output_until(client, result_id: str, needle: str) -> str:
    """Wait until a running command's stdout contains `needle`."""
    with anyio.fail_after(CANARY_SECONDS):
        while True:
            r = structured(await client.call_tool("inspect_result", {"result_id": result_id}))
            if needle in r["data"]:
                return r["data"]
            assert r["status"] == "running", r
            await anyio.sleep(0.1)


@pytest.fixture
def serve(sandbox_base):
    """`async with serve(*flags, state_dir=..., env=..., log=...) as client:`.

    `log`: a file that receives the server's stderr (its JSON log lines).
    At teardown: nothing left behind by any of the servers started.
    """
    state_dirs: list[Path] = []

    @contextlib.asynccontextmanager
    async def start(
        *extra: str, state_dir: Path | None = None, env: dict | None = None, log: Path | None = None, mode: str = "auto"
    ):
        sd = state_dir or sandbox_base / "state"
        state_dirs.append(sd)
        params = server_params(sandbox_base, *extra, state_dir=sd, env=env)
        if log is not None:
            params = StdioServerParameters(
                command="/bin/sh",
                args=["-c", f'exec "$0" "$@" 2>>{shlex.quote(str(log))}', params.command, *params.args],
                env=params.env,
            )
        async with Client(params, mode=mode) as client:
            yield client

    yield start
    assert leftovers(sandbox_base) == {}
    assert workspace_leftovers(sandbox_base, *state_dirs) == []


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


__all__ = [
    "BIN",
    "CANARY_SECONDS",
    "audit",
    "canary",
    "cgroup_file",
    "fresh_name",
    "kib",
    "mounts_under",
    "ok",
    "output_until",
    "proc_status",
    "run",
    "running_container",
    "server_pids",
    "structured",
    "text",
    "write_policy",
]
