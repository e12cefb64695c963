"""The server's own disk: a full state directory, huge commands, refusal floods (issue 14).

Findings 1-3: with the state directory on a small tmpfs, a command filling
/workspace made the server exit (ENOSPC raised out of the job task); ten
refused 30 MiB commands grew audit.jsonl by 300 MiB, and no rate limit
applied to refusals; thirty 1 MiB commands grew results.db by 36 MiB that
eviction never counted.
"""

from __future__ import annotations

import subprocess

import anyio
import pytest

from .conftest import audit, canary, ok, run, structured, text, write_policy

pytestmark = pytest.mark.runsc

DISK_FULL = ("No space left on device", "disk is full", "disk I/O error", "state disk")


def clear_error_or_result(r) -> str:
    """A call on a full disk either worked or says why not, plainly."""
    if r.is_error:
        msg = text(r)
        assert any(word in msg for word in DISK_FULL), msg
        return "refused"
    s = structured(r)
    if s.get("error"):
        assert any(word in s["error"] for word in DISK_FULL) or s["status"] != "exited", s
    return s["status"]


async def test_a_full_state_disk_fails_calls_clearly_and_the_server_keeps_serving(serve, sandbox_base):
    """The state directory (results, audit log, workspace images) on a 48 MiB
    tmpfs; the session workspace is a 1 GiB sparse image on it, so a command
    writing 100 MB into /workspace fills the disk the server writes to."""
    state = sandbox_base / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(state)], check=True)
    try:
        async with serve("--pool-size", "0", state_dir=state) as c:
            first = await ok(c, "echo stored-before")
            outcomes = []
            for _ in range(2):  # the reproduction failed on the second try
                r = await run(
                    c, command="dd if=/dev/zero of=/workspace/big bs=1M count=100 2>&1; echo dd=$?", timeout_seconds=120
                )
                outcomes.append(clear_error_or_result(r))
            # The disk is full now: calls (with output to store) fail clearly or work.
            for command in ("echo after", "head -c 3000000 /dev/zero | tr '\\0' x", "true"):
                outcomes.append(clear_error_or_result(await run(c, command=command)))
            refused = await run(c, command="true", memory_mb=10**6)  # a refusal still answers
            assert refused.is_error and "memory_mb" in text(refused)
            # The operator makes room: everything works again, nothing stored was lost.
            subprocess.run(["mount", "-o", "remount,size=256m", str(state)], check=True)
            with anyio.fail_after(60):
                while (r := await run(c, command="echo back")).is_error:
                    await anyio.sleep(0.5)
            assert structured(r)["stdout"] == "back\n", structured(r)
            page = await c.call_tool("inspect_result", {"result_id": first["result_id"]})
            assert structured(page)["data"] == "stored-before\n"
            await canary(c)
        lines = [e for e in audit(state) if e.get("decision") == "allowed"]
        assert first["result_id"] in {e.get("result_id") for e in lines}
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


async def test_huge_commands_are_cut_to_4kib_wherever_they_are_kept(serve, sandbox_base, tmp_path):
    state = sandbox_base / "state"
    big = "true " + "#" * (120 * 1024)  # one argument: under the kernel's 128 KiB per string
    huge = "true " + "#" * (8 << 20)  # refused anyway (memory above the ceiling)
    async with serve("--pool-size", "0") as c:
        s = await ok(c, big)
        r = await run(c, command=big + " ; sleep 300", background=True)
        rid = structured(r)["result_id"]
        listing = structured(await c.call_tool("list_active", {}))
        (entry,) = [e for e in listing["commands"] if e["result_id"] == rid]
        assert len(entry["command"]) < 4400 and "bytes in all, sha256 " in entry["command"]
        await c.call_tool("cancel_command", {"result_id": rid})
        for _ in range(10):  # refused (memory above the ceiling): each line stays small
            r = await run(c, command=huge, memory_mb=10**6)
            assert r.is_error
        await canary(c)
    entries = audit(state)
    assert all(len(e.get("command", "")) < 4400 for e in entries)
    allowed = next(e for e in entries if e.get("result_id") == s["result_id"])
    assert allowed["command_bytes"] == len(big) and len(allowed["command_sha256"]) == 64
    assert (state / "audit.jsonl").stat().st_size < 100 * 1024
    import sqlite3

    db = sqlite3.connect(state / "results.db")
    assert max(len(c) for (c,) in db.execute("SELECT command FROM results")) < 4400
    db.close()


async def test_refused_calls_count_against_the_rate_and_their_audit_is_throttled(serve, sandbox_base, tmp_path):
    policy = write_policy(tmp_path, "version: 1\nquotas: {runs_per_minute: 5}\n")
    state = sandbox_base / "state"
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        for _ in range(5):  # refused by the policy: each counts
            r = await run(c, command="true", memory_mb=10**6)
            assert r.is_error and "memory_mb" in text(r)
        for _ in range(40):  # now even a good call is over the rate
            r = await run(c, command="true")
            assert r.is_error and "runs_per_minute=5" in text(r) and "retry in" in text(r), text(r)
    decisions = [e["decision"] for e in audit(state)]
    assert decisions[:5] == ["denied"] * 5
    rate = [e for e in audit(state) if e["decision"] == "quota"]
    # 40 refusals in a few seconds: at most one line per second of them
    assert 1 <= len(rate) < 40 and rate[0]["reason"].startswith("quota:")
    assert "allowed" not in decisions
