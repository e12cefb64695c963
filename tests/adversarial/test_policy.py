"""Policy: requests above every ceiling, negative or absurd values, a network
the policy forbids, an unknown tenant, and hostile or broken policy files —
refused (or clamped where the operator said so), never silently unlimited.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import anyio
import pytest

from ..conftest import leftovers
from .conftest import (
    BIN,
    CANARY_SECONDS,
    audit,
    canary,
    cgroup_file,
    ok,
    run,
    running_container,
    server_pids,
    structured,
    text,
    write_policy,
)

pytestmark = pytest.mark.runsc

CEILINGS = """version: 1
defaults: {cpus: 0.5, memory: 128MiB, max_pids: 32, timeout: 10s}
ceilings: {cpus: 1, memory: 256MiB, max_pids: 64, timeout: 30s}
"""


async def test_requests_above_every_ceiling_and_negative_or_absurd_values_are_refused(serve, sandbox_base, tmp_path):
    policy = write_policy(tmp_path, CEILINGS)
    state = sandbox_base / "state"
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        over = {
            "cpus": (2, "1 CPUs"),
            "memory_mb": (512, "256 MiB"),
            "max_pids": (65, "64"),
            "timeout_seconds": (31, "30 s"),
        }
        for field, (value, ceiling) in over.items():
            r = await run(c, command="true", **{field: value})
            assert r.is_error and field in text(r) and ceiling in text(r), text(r)
        for field in over:
            # (Numbers sent as strings are read as numbers, like "2": then the ceilings apply.)
            for value in (0, -1, -(10**9), 10**30, 1e308, "1e999", "inf", "-inf", "nan", "abc", [1], {"a": 1}):
                r = await run(c, command="true", **{field: value})
                assert r.is_error, (field, value, structured(r))
        r = await run(c, command="true", network="none", memory_mb=16 * 1024 * 1024)
        assert r.is_error
        decisions = [e["decision"] for e in audit(state)]
        assert decisions[: len(over)] == ["denied"] * len(over)  # named and refused by the policy
        assert "allowed" not in decisions  # nothing ran (the rest never got past the tool's schema)
        await canary(c)


async def test_a_clamping_policy_grants_the_ceiling_and_enforces_it(serve, tmp_path):
    policy = write_policy(tmp_path, CEILINGS + "on_exceed: clamp\n")
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        r = await run(c, command="sleep 300", memory_mb=10**6, background=True)
        s = structured(r)
        entry = next(e for e in s["limits"]["entries"] if e["field"] == "memory_mb")
        assert (entry["requested"], entry["granted"], entry["rule"]) == (10**6, 256, "clamped to ceiling")
        cid = await running_container(c, s["result_id"])
        limit = cgroup_file(cid, "memory", "memory.limit_in_bytes")
        if not limit.exists():
            limit = cgroup_file(cid, "memory", "memory.max")
        assert int(limit.read_text()) == 256 * 1024 * 1024  # the host enforces the ceiling
        await c.call_tool("cancel_command", {"result_id": s["result_id"]})
        # Too little is never clamped up: it is refused.
        for field, value in (("memory_mb", 8), ("max_pids", 2), ("cpus", 0.001)):
            r = await run(c, command="true", **{field: value})
            assert r.is_error and field in text(r), text(r)
        await canary(c)


async def test_network_host_is_refused_and_network_sandbox_allows_nothing_by_default(serve, tmp_path):
    async with serve("--pool-size", "0") as c:  # the built-in policy: none only
        for network in ("host", "sandbox", "bridge", ""):
            r = await run(c, command="true", network=network)
            assert r.is_error and "none" in text(r), text(r)
        await canary(c)
    policy = write_policy(tmp_path, "version: 1\nnetwork: {allowed: [none, sandbox]}\n")
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        r = await run(c, command="true", network="host")
        assert r.is_error
        # Allowed, with no egress rule: the proxy refuses everything (before
        # any name is resolved), and nothing else is reachable.
        r = await run(c, command="curl -fsS -m 10 https://example.com/; echo rc=$?", network="sandbox")
        s = structured(r)
        assert s["status"] == "exited" and "rc=" in s["stdout"] and "rc=0" not in s["stdout"], (
            s["stdout"],
            s["stderr"],
        )
        assert "network: denied example.com:443 (not in the egress allowlist)" in text(r)
        await canary(c)


@pytest.mark.parametrize("tenant", ["nobody", "../../etc", "default/../a", "A"])
async def test_an_unknown_tenant_is_refused_at_start(sandbox_base, tmp_path, tenant):
    """(tests/protocol/test_lifecycle.py covers `--tenant nobody` on the built-in policy.)"""
    policy = write_policy(tmp_path, "version: 1\ntenants:\n  a: {}\n  b: {}\n")
    state = tmp_path / "state"
    r = await anyio.run_process(
        [
            str(BIN),
            "serve",
            "--policy",
            str(policy),
            "--tenant",
            tenant,
            "--state-dir",
            str(state),
            "--state-root",
            str(sandbox_base),
        ],
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode != 0 and r.stdout == b""
    err = r.stderr.decode()
    # The exact refusal: what was asked and what exists (not letters any message contains).
    assert f"tenant {tenant!r} is not defined in the policy; defined tenants: default, a, b" in err, err
    assert not (state / "workspaces").exists()
    assert leftovers(sandbox_base) == {}


def alias_bomb(path: Path) -> Path:
    """A few hundred bytes that expand to 9**9 (387 million) strings if aliases are followed."""
    lines = ["version: 1", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def hostile_files(tmp_path: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    return {
        "alias bomb": (alias_bomb(tmp_path / "bomb.yaml"), "aliases"),
        "python tag": (
            write_policy(
                tmp_path, f'version: 1\ndefaults: !!python/object/apply:os.system ["touch {marker}"]\n', "tag.yaml"
            ),
            "tag",
        ),
        "python tag at top": (
            write_policy(tmp_path, f'!!python/object/apply:os.system ["touch {marker}"]\n', "tag2.yaml"),
            "tag",
        ),
        "deep nesting": (
            write_policy(tmp_path, "version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml"),
            "nested",
        ),
        "huge file": (write_policy(tmp_path, "version: 1\n# " + "x" * (300 * 1024) + "\n", "big.yaml"), "bytes"),
        "merge key": (write_policy(tmp_path, "version: 1\n<<: {defaults: {memory: 1TiB}}\n", "merge.yaml"), "<<"),
    }


async def test_hostile_policy_files_are_refused_quickly(sandbox_base, tmp_path):
    marker = tmp_path / "PWNED"
    for name, (path, expected) in hostile_files(tmp_path, marker).items():
        with anyio.fail_after(CANARY_SECONDS):  # generous: "quickly" means not expanding anything
            r = await anyio.run_process([str(BIN), "policy", "check", str(path)], check=False)
        assert r.returncode == 1 and expected in r.stderr.decode(), (name, r.stderr.decode())
        with anyio.fail_after(CANARY_SECONDS):
            r = await anyio.run_process(
                [
                    str(BIN),
                    "serve",
                    "--policy",
                    str(path),
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--state-root",
                    str(sandbox_base),
                ],
                check=False,
                env={"PATH": os.environ["PATH"]},
            )
        assert r.returncode != 0 and r.stdout == b"" and expected in r.stderr.decode(), (name, r.stderr.decode())
    assert not marker.exists()
    assert leftovers(sandbox_base) == {}


async def test_a_reload_with_a_broken_or_hostile_file_keeps_the_old_policy(serve, sandbox_base, tmp_path):
    """SIGHUP with an alias bomb, a python tag, a syntax error and a default
    above its ceiling: each reload
    fails (logged) and the last good policy keeps deciding; a good file after
    them is applied, which shows the bad ones were read and refused.
    (tests/protocol/test_lifecycle.py covers a plain syntax error.)"""
    marker = tmp_path / "PWNED"
    policy = write_policy(tmp_path, CEILINGS)
    log = tmp_path / "server.log"
    hostile = hostile_files(tmp_path, marker)
    async with serve("--policy", str(policy), "--pool-size", "0", log=log) as c:
        [pid] = server_pids(sandbox_base)
        bad = [
            hostile["alias bomb"][0].read_text(),
            hostile["python tag"][0].read_text(),
            "version: 1\nceilings: {memory: [oops\n",
            "version: 1\ndefaults: {memory: 1GiB}\nceilings: {memory: 512MiB}\n",
        ]  # default above ceiling
        for n, body in enumerate(bad, start=1):
            policy.write_text(body)
            os.kill(pid, signal.SIGHUP)
            with anyio.fail_after(CANARY_SECONDS):
                while log.read_text().count("policy_reload_failed") < n:
                    await anyio.sleep(0.05)
            r = await run(c, command="true", memory_mb=512)
            assert r.is_error and "256 MiB" in text(r), text(r)  # the old ceiling holds
            await ok(c, "true", memory_mb=256)
        assert not marker.exists()
        policy.write_text(CEILINGS.replace("memory: 256MiB", "memory: 512MiB"))
        os.kill(pid, signal.SIGHUP)
        with anyio.fail_after(CANARY_SECONDS):
            while (await run(c, command="true", memory_mb=512)).is_error:
                await anyio.sleep(0.1)
        await canary(c)
    assert f"gm-{uuid.uuid4().hex}" not in log.read_text()  # (the log is readable JSON lines)
