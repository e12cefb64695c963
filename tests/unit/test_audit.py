"""The audit log on a real file: one JSON line per call, append-only.

The last tests drive `Jobs._finish` (the one place that writes the audit line
of a run) with a real ResultStore and a real AuditLog, so that the fields the
product promises are checked where they are decided.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gvisor_mcp.audit import AuditLog
from gvisor_mcp.jobs import Job, Jobs
from gvisor_mcp.results import ResultStore
from gvisor_mcp.sandbox import ContainerResult, ContainerStatus, ManagerConfig


def lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode("ascii").split("\n")[:-1]]


def test_one_valid_json_line_per_write(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    log = AuditLog(path)
    before = int(time.time())
    nasty = 'echo "a\nb" \\ \t\x00 \u00e9\u4e2d \U0001f600 \udcff'
    log.write(
        tenant="alice",
        command=nasty,
        policy_hash="sha256:ab",
        decision="allowed",
        status="exited",
        exit_code=0,
        duration_ms=12,
        boot_ms=3,
    )
    log.write(tenant="bob", command="rm -rf /", decision="denied", reason="policy: no", path=Path("/x"))
    log.close()
    after = int(time.time())

    got = lines(path)
    assert len(got) == 2
    assert got[0]["command"] == nasty
    assert got[0]["tenant"] == "alice" and got[0]["exit_code"] == 0
    assert got[1] == {
        "tenant": "bob",
        "command": "rm -rf /",
        "decision": "denied",
        "reason": "policy: no",
        "path": "/x",
        "time": got[1]["time"],
        "command_bytes": 8,
        "command_sha256": hashlib.sha256(b"rm -rf /").hexdigest(),
    }
    for entry in got:
        t = calendar.timegm(time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ"))
        assert before <= t <= after
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopening_appends_and_two_writers_keep_all_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path)
    first.write(n=0)
    first.close()
    first.close()  # idempotent

    a, b = AuditLog(path), AuditLog(path)
    for i in range(1, 7):
        (a if i % 2 else b).write(n=i, writer="a" if i % 2 else "b")
    a.close()
    b.close()
    assert [e["n"] for e in lines(path)] == list(range(7))


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gvisor_mcp.audit import AuditLog

    log = AuditLog(Path(sys.argv[1]))
    for i in range(300):
        log.write(writer=sys.argv[2], n=i, command=sys.argv[2] * 3000)
    log.close()
    """
)


@pytest.mark.slow
def test_concurrent_processes_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).write(n=-1, writer="parent")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), w]) for w in ("x", "y")]
    assert [p.wait() for p in procs] == [0, 0]
    got = lines(path)
    assert got[0] == {"n": -1, "writer": "parent", "time": got[0]["time"]}
    for w in ("x", "y"):
        mine = [e for e in got if e["writer"] == w]
        assert [e["n"] for e in mine] == list(range(300))
        assert all(e["command"] == w * 3000 for e in mine)


# --- the run's audit line, as jobs.py writes it -------------------------------------------

PROMISED = {"time", "tenant", "command", "policy_hash", "decision", "status", "exit_code", "duration_ms", "boot_ms"}


def finish_run(tmp_path: Path, result: ContainerResult | None, status: str, error: str | None):  # type: ignore[no-untyped-def]
    store = ResultStore(tmp_path / "state")
    audit = AuditLog(tmp_path / "state" / "audit.jsonl")
    # _finish never reaches the Manager; only its config is read (capacity).
    no_manager = SimpleNamespace(config=ManagerConfig())
    jobs = Jobs(no_manager, store, audit, None)  # type: ignore[arg-type]
    rid = store.new_id()
    job = Job(result_id=rid, tenant="alice", session="s1", command="make test", limits={"timeout": "30s"}, timeout=30.0)
    store.start(rid, tenant="alice", session="s1", command="make test", container_id=None, limits=job.limits)
    writers = (store.part_writer(rid, "stdout", 100), store.part_writer(rid, "stderr", 100))
    jobs._finish(job, result, status, error, writers, "sha256:feed")
    return store, audit, rid


async def test_a_finished_run_writes_one_line_with_the_promised_fields(tmp_path: Path) -> None:
    result = ContainerResult(
        container_id="gvm-1",
        exit_code=2,
        stdout=b"out",
        stderr=b"err",
        stdout_bytes=3,
        stderr_bytes=3,
        duration=1.5,
        boot_duration=0.25,
        status=ContainerStatus.EXITED,
    )
    store, audit, rid = finish_run(tmp_path, result, "exited", None)
    try:
        (entry,) = lines(audit.path)
        assert entry.keys() >= PROMISED
        assert entry["tenant"] == "alice" and entry["command"] == "make test"
        assert entry["policy_hash"] == "sha256:feed" and entry["decision"] == "allowed"
        assert entry["status"] == "exited" and entry["exit_code"] == 2
        assert entry["duration_ms"] == 1500 and entry["boot_ms"] == 250
        assert entry["result_id"] == rid and entry["container_id"] == "gvm-1"
        stored = store.get(rid, "alice")
        assert stored is not None and stored.status == "exited" and stored.exit_code == 2
    finally:
        store.close()
        audit.close()


async def test_a_run_without_a_sandbox_is_audited_too(tmp_path: Path) -> None:
    store, audit, rid = finish_run(tmp_path, None, "killed", "cancelled before a sandbox was free")
    try:
        (entry,) = lines(audit.path)
        assert PROMISED - {"boot_ms"} <= entry.keys()
        assert entry["status"] == "killed" and entry["exit_code"] is None
        assert isinstance(entry["duration_ms"], int)
        assert entry["error"] == "cancelled before a sandbox was free"
        stored = store.get(rid, "alice")
        assert stored is not None and stored.status == "killed"
    finally:
        store.close()
        audit.close()


# --- bounded: rotation, logrotate, throttled refusals ------------------------------------------


@pytest.mark.slow
def test_the_log_rotates_and_never_holds_more_than_keep_plus_one_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=64 * 1024, keep=2)
    for i in range(2000):  # ~10 MB of commands, cut to 4 KiB each: ~9 MB written in all
        log.write(n=i, command="x" * 5000)
    log.close()
    files = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith("audit.jsonl") and not p.name.endswith(".lock")
    )
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 64 * 1024
    # The newest lines are in audit.jsonl, in order, each whole.
    newest = lines(path)
    assert newest[-1]["n"] == 1999
    assert [e["n"] for e in lines(tmp_path / "audit.jsonl.1") + newest] == list(
        range(newest[-1]["n"] - len(newest) - len(lines(tmp_path / "audit.jsonl.1")) + 1, 2000)
    )
    assert all(e["command_bytes"] == 5000 and len(e["command"]) < 4300 for e in newest)


def test_two_writers_rotate_without_losing_or_mixing_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a = AuditLog(path, max_bytes=16 * 1024, keep=50)
    b = AuditLog(path, max_bytes=16 * 1024, keep=50)
    for i in range(600):
        (a if i % 2 else b).write(n=i, pad="p" * 200)
    a.close()
    b.close()
    got = []
    for f in tmp_path.glob("audit.jsonl*"):
        if not f.name.endswith(".lock"):
            got += [e["n"] for e in lines(f)]
    assert sorted(got) == list(range(600))


def test_an_externally_rotated_log_is_reopened_without_a_signal(tmp_path: Path) -> None:
    """logrotate's default: rename the file; the server's next line creates a new one."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write(n=1)
    path.rename(tmp_path / "audit.jsonl.1")
    log.write(n=2)
    path.rename(tmp_path / "audit.jsonl.2")
    (tmp_path / "audit.jsonl.2").unlink()  # e.g. compressed and removed
    log.write(n=3)
    log.close()
    assert [e["n"] for e in lines(tmp_path / "audit.jsonl.1")] == [1]
    assert [e["n"] for e in lines(path)] == [3]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_throttled_lines_say_how_many_were_left_out(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(50):
        log.write_throttled("rate:alice", 3600, n=i)
    log.write_throttled("rate:bob", 3600, n=100)
    log._throttle["rate:alice"] = (time.monotonic() - 7200, log._throttle["rate:alice"][1])  # an hour on
    log.write_throttled("rate:alice", 3600, n=50)
    log.close()
    got = lines(path)
    assert [(e["n"], e.get("suppressed")) for e in got] == [(0, None), (100, None), (50, 49)]


def test_a_full_disk_never_raises_and_the_lines_are_written_once_there_is_room(small_tmpfs: Path) -> None:
    from gvisor_mcp.audit import AuditUnavailable
    from tests.conftest import fill_disk

    path = small_tmpfs / "audit.jsonl"
    log = AuditLog(path)
    assert log.write(n=0)
    filler = fill_disk(small_tmpfs)
    results = [log.write(n=n, command="c" * 3000) for n in range(1, 6)]  # no exception out of write()
    assert results[-1] is False  # (the first may still fit in the file's last page)
    try:
        log.writable()
        raise AssertionError("writable() must refuse while lines are pending")
    except AuditUnavailable as e:
        assert "No space left on device" in str(e)
    filler.unlink()
    log.writable()  # the backlog goes out, in order
    log.write(n=6)
    log.close()
    assert [e["n"] for e in lines(path)] == [0, 1, 2, 3, 4, 5, 6]
