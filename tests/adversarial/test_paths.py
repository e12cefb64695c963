"""Paths and arguments: whatever a request puts in workdir, env, command or
extra fields, it is either refused or acts only inside the sandbox.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import anyio
import pytest

from .conftest import (
    canary,
    ok,
    output_until,
    run,
    running_container,
    structured,
    text,
    write_policy,
)

pytestmark = pytest.mark.runsc

TOOL_FIELDS = {
    "command",
    "workdir",
    "env",
    "stdin",
    "timeout_seconds",
    "cpus",
    "memory_mb",
    "max_pids",
    "network",
    "egress",
    "image",
    "background",
}


def refused(r) -> str:
    """A request refused before any sandbox ran: its error text."""
    if r.is_error:
        return text(r)
    s = structured(r)
    assert s["status"] == "error" and s["container_id"] is None, s  # never started
    return s["error"]


def etc_listing(base: Path) -> list[str]:
    return sorted(os.listdir(base / "bundles" / ".image" / "etc"))


async def test_hostile_workdirs_are_refused_or_stay_inside(serve, sandbox_base):
    odd = "/workspace/\u202eevil\u0301 \U0001f600\ttab"
    async with serve("--pool-size", "0") as c:
        etc_before = etc_listing(sandbox_base)
        for workdir in (
            "/proc/self/fd/3",
            "/proc/1/cwd",
            "../../etc",
            "/workspace/../../etc",
            "/tmp/\x00x",
            "/" + "a" * 5000,
            "/dev/shm/../../etc",
            "/nonexistent",
        ):
            msg = refused(await run(c, command="pwd", workdir=workdir))
            assert "workdir" in msg, msg
        # Odd but valid Unicode is just a name: the command runs exactly there.
        await ok(c, f"mkdir -p '{odd}'")
        s = await ok(c, "pwd", workdir=odd)
        # Shown rendered (the bidi override escaped; text.render), exact in base64.
        assert s["stdout"] == "/workspace/\\u202eevil\u0301 \U0001f600\ttab\n"
        raw = await c.call_tool("inspect_result", {"result_id": s["result_id"], "encoding": "base64"})
        assert base64.b64decode(structured(raw)["data"]) == (odd + "\n").encode()
        assert etc_listing(sandbox_base) == etc_before
        await canary(c)


async def test_a_symlink_planted_in_the_workspace_is_never_followed_by_the_server(serve, sandbox_base):
    """A link to /etc in the workspace means the SANDBOX's /etc. The server's
    workdir check used to follow it on the host: /etc/apt (which exists on the
    host only) was accepted while a made-up name was refused — an oracle for
    host directories — and runsc then created `apt` in the generated /etc all
    runs share. Now both are refused alike and nothing is created."""
    host_only = next(d for d in ("apt", "ssh", "default", "security") if Path("/etc", d).is_dir())
    async with serve("--pool-size", "0") as c:
        await ok(c, "ln -s /etc /workspace/hostetc && ln -s ../../../../.. /workspace/up")
        etc_before = etc_listing(sandbox_base)
        made_up = f"nonexistent-{uuid.uuid4().hex[:8]}"
        answers = {}
        for name in (host_only, made_up):
            msg = refused(await run(c, command="pwd", workdir=f"/workspace/hostetc/{name}"))
            answers[name] = msg.replace(name, "<NAME>")
        assert answers[host_only] == answers[made_up]
        for workdir in (f"/workspace/up/etc/{host_only}", f"/workspace/up/etc/{made_up}"):
            refused(await run(c, command="pwd", workdir=workdir))
        assert etc_listing(sandbox_base) == etc_before
        # Through the link the sandbox reads its own /etc, never the host's.
        s = structured(await run(c, command="cat hostetc/passwd; cat hostetc/shadow", workdir="/workspace"))
        assert "sandbox:x:1000" in s["stdout"] and "No such file" in s["stderr"], s
        assert s["stdout"] == Path(sandbox_base / "bundles" / ".image" / "etc" / "passwd").read_text()
        await canary(c)


async def test_a_workdir_swapped_for_a_symlink_while_it_is_checked_creates_nothing_on_the_host(serve, tmp_path):
    """A background command flips a workspace entry between a real directory
    and a link to a directory of the host's /usr (read-only inside) while
    foreground calls ask for a workdir below it. runsc creates a missing cwd
    on the host, as root, even in a read-only bind: if the swap landed between
    the server's check and runsc's start, an empty directory appeared in the
    host's /usr. Cold runs now start in / and change directory inside the
    sandbox, so the race can only make the `cd` fail."""
    victim = Path("/usr/local/share") / f"gvisor-mcp-adversarial-{uuid.uuid4().hex[:8]}"
    victim.mkdir(parents=True)
    try:
        async with serve("--pool-size", "0") as c:
            flipper = structured(
                await run(
                    c,
                    background=True,
                    command=f"""
cd /workspace && mkdir -p real/newdir && ln -s real flip && echo flipping
while :; do ln -sfn {victim} flip; ln -sfn real flip; done
""",
                )
            )["result_id"]
            await output_until(c, flipper, "flipping")
            outcomes = set()
            for _ in range(40):
                s = structured(await run(c, command="pwd", workdir="/workspace/flip/newdir"))
                outcomes.add(s["status"] if s["status"] == "error" else (s["exit_code"], s["stdout"]))
            assert list(victim.iterdir()) == [], outcomes
            await c.call_tool("cancel_command", {"result_id": flipper})
            await canary(c)
        assert list(victim.iterdir()) == []
    finally:
        shutil.rmtree(victim)


async def test_ld_preload_and_bash_env_are_refused_or_reach_only_the_sandbox(serve, sandbox_base, tmp_path):
    async with serve("--pool-size", "0") as c:
        for key in ("LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "BASH_FUNC_x%%", "SHELLOPTS"):
            msg = text(r := await run(c, command="true", env={key: "/tmp/evil.so"}))
            assert r.is_error and "env" in msg, msg
    # A policy that allows them: they reach the sandbox, never the host's runsc.
    policy = write_policy(tmp_path, "version: 1\nenv: {deny: []}\n")
    marker = f"/nonexistent/gm-{uuid.uuid4().hex[:8]}.so"
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        env = {"LD_PRELOAD": marker, "BASH_ENV": marker, "LD_LIBRARY_PATH": marker}
        s = structured(await run(c, command="echo $LD_PRELOAD; sleep 300", env=env, background=True))
        await running_container(c, s["result_id"])
        seen = await output_until(c, s["result_id"], marker)
        assert seen.startswith(marker)  # inside: exactly what was asked
        runsc = [p for p in os.listdir("/proc") if p.isdigit() and _has(p, f"--root={sandbox_base}/runsc")]
        assert runsc
        for p in runsc:
            assert marker.encode() not in _read(f"/proc/{p}/environ")
        await c.call_tool("cancel_command", {"result_id": s["result_id"]})
        await canary(c)


def _has(pid: str, needle: str) -> bool:
    return needle.encode() in _read(f"/proc/{pid}/cmdline")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


async def test_shell_metacharacters_run_only_inside_the_sandbox(serve, tmp_path):
    marker = tmp_path / "pwned"
    commands = [
        f"touch {marker}",
        f"echo $(touch {marker}) `touch {marker}`",
        f"'; touch {marker}; echo '",
        f"true && touch {marker} || touch {marker}; touch {marker} & wait",
        f"cat <<EOF > {marker}\nx\nEOF",
        f"--version; touch {marker}",
        f"-c 'touch {marker}'",
        "echo \x1b]0;title\x07 \x00".replace("\x00", "") + f"; touch {marker}",
    ]
    async with serve("--pool-size", "0") as c:
        for command in commands:
            r = await run(c, command=command)
            assert not r.is_error, text(r)
            assert not marker.exists(), command
        s = await ok(c, 'echo "$(id -u) $(hostname)"')
        assert s["stdout"] == "1000 sandbox\n"
        await canary(c)
    assert not marker.exists()


async def test_no_request_field_chooses_a_container_id_runsc_flag_annotation_device_or_capability(serve, sandbox_base):
    hostile = {
        "container_id": "mine",
        "id": "../../x",
        "runsc_flags": ["--network=host", "--root=/"],
        "flags": "--debug",
        "annotations": {"dev.gvisor.spec.mount": "/"},
        "devices": ["/dev/kvm", "/dev/vda"],
        "capabilities": ["CAP_SYS_ADMIN"],
        "privileged": True,
        "user": "0:0",
        "uid": 0,
        "tenant": "other",
        "session_id": "x",
        "rootfs": "/",
        "mounts": [{"source": "/", "destination": "/host"}],
        "platform": "kvm",
        "cgroup_parent": "/",
        "hostname": "host",
        "readonly": False,
    }
    async with serve("--pool-size", "0") as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        props = set(tools["execute_command"].input_schema["properties"])
        assert props == TOOL_FIELDS  # nothing else can even be named
        r = await run(
            c,
            command="id -u; hostname; grep CapEff /proc/self/status; ls /dev; ls / ; sleep 300",
            background=True,
            **hostile,
        )
        # Extra fields are ignored: the call runs (were it refused, none of the
        # checks below would mean anything, so a refusal fails the test)...
        assert not r.is_error, text(r)
        s = structured(r)
        rid = s["result_id"]
        cid = await running_container(c, rid)
        assert re.fullmatch(r"gm-[0-9a-f]{8}-[0-9a-f]{12}", cid)
        out = await output_until(c, rid, "tmp")
        assert out.startswith("1000\nsandbox\nCapEff:\t0000000000000000\n"), out
        assert "kvm" not in out and "vda" not in out and "host" not in out.split()
        # ...and none of them reached the OCI spec runsc was given.
        spec = json.loads((sandbox_base / "bundles" / cid / "config.json").read_text())
        assert "annotations" not in spec and "devices" not in spec.get("linux", {})
        assert spec["process"]["user"] == {"uid": 1000, "gid": 1000}
        assert all(caps == [] for caps in spec["process"]["capabilities"].values())
        assert spec["hostname"] == "sandbox"
        assert {m["destination"] for m in spec["mounts"]} <= {
            "/proc",
            "/dev",
            "/sys",
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib32",
            "/lib64",
            "/libx32",
            "/etc",
            "/tmp",
            "/workspace",
        }
        await c.call_tool("cancel_command", {"result_id": rid})
        for args in ({"image": "/"}, {"image": "../etc"}, {"network": "host"}, {"network": "--network=host"}):
            r = await run(c, command="true", **args)
            assert r.is_error, structured(r)
        await canary(c)


# --- requests the SDK's client cannot even send: raw JSON-RPC lines -------------

HOSTILE_LINES = {
    "lone surrogate in workdir": '{"command": "pwd", "workdir": "/workspace/\\ud800"}',
    "lone surrogate in command": '{"command": "echo \\ud800"}',
    "lone surrogate in an env key": '{"command": "true", "env": {"\\ud800": "x"}}',
    "message over the 64 MiB line limit": '{"command": "wc -c", "stdin": "' + "y" * (65 * 1024 * 1024) + '"}',
}


async def _send_raw(server, arguments: str) -> int:
    server._next += 1
    line = (
        f'{{"jsonrpc":"2.0","id":{server._next},"method":"tools/call",'
        f'"params":{{"name":"execute_command","arguments":{arguments}}}}}\n'
    )
    await server.process.stdin.send(line.encode())
    return server._next


async def _answers(server, ids: list[int], seconds: float) -> dict[int, dict]:
    """The answers among `ids` that arrive within `seconds`."""
    got: dict[int, dict] = {}
    with anyio.move_on_after(seconds):
        while len(got) < len(ids):
            msg = await server.receive()
            if msg.get("id") in ids:
                got[msg["id"]] = msg
    return got


def _audit(state: Path) -> list[dict]:
    path = state / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def test_undecodable_and_oversized_requests_leave_the_server_serving(sandbox_base, tmp_path):
    """Lone UTF-16 surrogates (valid JSON escapes, not encodable text) and a
    line past the stdio limit start nothing, and the server goes on answering."""
    from ..conftest import leftovers
    from ..protocol.test_lifecycle import start, wait_exit

    state = tmp_path / "state"
    server = await start(sandbox_base, state, "--pool-size", "0")
    try:
        ids = [await _send_raw(server, arguments) for arguments in HOSTILE_LINES.values()]
        for answer in (await _answers(server, ids, 2)).values():  # whatever answers is an error
            assert "error" in answer or answer["result"].get("isError"), answer
        with anyio.fail_after(60):
            r = await server.call("execute_command", {"command": "echo ok"})
        assert r["stdout"] == "ok\n"
        assert [e["command"] for e in _audit(state) if e["decision"] == "allowed"] == ["echo ok"]
    finally:
        await server.process.stdin.aclose()
        await wait_exit(server)
    assert leftovers(sandbox_base) == {}


async def test_undecodable_and_oversized_requests_get_an_error_answer(sandbox_base, tmp_path):
    from ..conftest import leftovers
    from ..protocol.test_lifecycle import start, wait_exit

    server = await start(sandbox_base, tmp_path / "state", "--pool-size", "0")
    try:
        ids = {await _send_raw(server, arguments): case for case, arguments in HOSTILE_LINES.items()}
        got = await _answers(server, list(ids), 10)  # errors take milliseconds; 10 s is generous
        assert sorted(ids[i] for i in got) == sorted(ids.values()), "no answer for: " + ", ".join(
            case for i, case in ids.items() if i not in got
        )
        for answer in got.values():
            assert "error" in answer or answer["result"].get("isError"), answer
    finally:
        await server.process.stdin.aclose()
        await wait_exit(server)
    assert leftovers(sandbox_base) == {}
