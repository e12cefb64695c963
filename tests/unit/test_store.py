"""The result store on a real SQLite file and real stream files in tmp_path.

No mocks: every test opens `ResultStore` on a directory and checks what it
stores, what it reads back and what is left on disk. The only stand-in is the
wall clock (`clock=`), so that ages are exact without sleeping. Two stores on
one directory are two servers; a child process killed with SIGKILL is a
crashed server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gvisor_mcp.results import RESULT_ID_RE, ResultStore
from gvisor_mcp.results.store import ROW_OVERHEAD_BYTES

CRASH_REASON = "the server stopped"
LIMITS = {"timeout": "30s", "memory": 268435456}
ROW = ROW_OVERHEAD_BYTES + len("echo hi") + len("sess1") + len(json.dumps(LIMITS))
"""What one row of begin() costs besides its streams: eviction counts every byte."""


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path, clock: Clock):  # type: ignore[no-untyped-def]
    s = ResultStore(state, clock=clock)
    yield s
    s.close()


def begin(store: ResultStore, tenant: str = "alice", command: str = "echo hi") -> str:
    rid = store.new_id()
    store.start(rid, tenant=tenant, session="sess1", command=command, container_id=None, limits=LIMITS)
    return rid


def complete(store: ResultStore, tenant: str, stdout: bytes, stderr: bytes = b"") -> str:
    """One run as jobs.py does it: start, part writers, finish, evict."""
    rid = begin(store, tenant)
    writers = [store.part_writer(rid, s, 1 << 20) for s in ("stdout", "stderr")]
    writers[0](stdout)
    writers[1](stderr)
    for w in writers:
        w.close()
    store.finish(
        rid,
        status="exited",
        stdout=stdout,
        stderr=stderr,
        fields={"exit_code": 0, "stdout_bytes": len(stdout), "stderr_bytes": len(stderr)},
    )
    store.evict(tenant)
    return rid


def read_all(store: ResultStore, rid: str, tenant: str, stream: str) -> bytes:
    res = store.get(rid, tenant)
    assert res is not None
    data, total = store.read(res, stream, 0, 1 << 30)
    assert total == len(data)
    return data


def files_of(store: ResultStore, rid: str) -> list[str]:
    return sorted(p.name for p in store.out_dir.iterdir() if p.name.startswith(rid))


# --- round trip -----------------------------------------------------------------

BINARY = bytes(range(256)) + b"\r\n\x00tail\n"


def test_round_trip_while_running_and_after_finish(store: ResultStore) -> None:
    rid = begin(store)
    out = store.part_writer(rid, "stdout", 1 << 20)
    err = store.part_writer(rid, "stderr", 1 << 20)
    out(BINARY[:100])
    err(b"warning: \xff\xfe not utf-8\n")
    out(BINARY[100:])

    running = store.get(rid, "alice")
    assert running is not None and running.status == "running"
    assert running.finished_at is None and running.exit_code is None
    assert running.command == "echo hi" and running.session == "sess1"
    assert running.limits == {"timeout": "30s", "memory": 268435456}
    # Live pages come from the part files.
    assert store.read(running, "stdout", 0, 1 << 20) == (BINARY, len(BINARY))
    assert store.read(running, "stdout", 10, 5) == (BINARY[10:15], len(BINARY))
    warning = b"warning: \xff\xfe not utf-8\n"
    assert store.read(running, "stderr", 0, 100) == (warning, len(warning))
    assert files_of(store, rid) == [f"{rid}.stderr.part", f"{rid}.stdout.part"]

    out.close()
    err.close()
    store.finish(
        rid,
        status="exited",
        stdout=BINARY,
        stderr=b"E",
        fields={
            "exit_code": 3,
            "signal": None,
            "duration_ms": 1234,
            "boot_ms": 56,
            "oom_killed": True,
            "peak_memory_bytes": 4096,
            "stdout_bytes": len(BINARY),
            "stderr_bytes": 1,
            "stdout_truncated": False,
            "stderr_truncated": False,
            "container_id": "gvm-abc",
            "error": None,
        },
    )
    done = store.get(rid, "alice")
    assert done is not None
    assert (done.status, done.exit_code, done.duration_ms, done.boot_ms) == ("exited", 3, 1234, 56)
    assert done.oom_killed is True and done.stdout_truncated is False
    assert (done.peak_memory_bytes, done.container_id) == (4096, "gvm-abc")
    assert done.finished_at is not None
    assert done.limits == {"timeout": "30s", "memory": 268435456}
    # A reader still holding the stale "running" row is served from the final file.
    assert store.read(running, "stdout", 0, 1 << 20) == (BINARY, len(BINARY))
    assert store.read(done, "stdout", 0, 1 << 20) == (BINARY, len(BINARY))
    assert store.read(done, "stderr", 0, 1 << 20) == (b"E", 1)
    assert files_of(store, rid) == [f"{rid}.stderr", f"{rid}.stdout"]


def test_capture_cap_bounds_stored_bytes_not_counted_bytes(store: ResultStore) -> None:
    cap = 10
    rid = begin(store)
    w = store.part_writer(rid, "stdout", cap)
    stream = b"0123456" + b"789abcd" + b"efghijk"  # 21 bytes written by the command
    for i in range(0, len(stream), 7):
        w(stream[i : i + 7])
    w(b"more after the cap")

    running = store.get(rid, "alice")
    assert running is not None
    # While running, the part file holds the first `cap` bytes only.
    assert store.read(running, "stdout", 0, 100) == (stream[:cap], cap)
    assert (store.out_dir / f"{rid}.stdout.part").stat().st_size == cap

    # The Manager's capture: first cap//2 bytes then last cap - cap//2 bytes.
    captured = stream[: cap // 2] + stream[-(cap - cap // 2) :]
    written = len(stream) + len(b"more after the cap")
    w.close()
    store.finish(
        rid,
        status="exited",
        stdout=captured,
        fields={"exit_code": 0, "stdout_bytes": written, "stdout_truncated": True},
    )
    done = store.get(rid, "alice")
    assert done is not None
    assert done.stdout_bytes == written and done.stdout_truncated is True
    assert store.read(done, "stdout", 0, 100) == (captured, cap)
    assert store.read(done, "stdout", cap // 2, 100) == (stream[-(cap - cap // 2) :], cap)


def test_writer_after_close_and_zero_cap_store_nothing(store: ResultStore) -> None:
    rid = begin(store)
    w = store.part_writer(rid, "stdout", 0)
    w(b"dropped")
    e = store.part_writer(rid, "stderr", 100)
    e(b"kept")
    e.close()
    e(b" after close")
    res = store.get(rid, "alice")
    assert res is not None
    assert store.read(res, "stdout", 0, 100) == (b"", 0)
    assert store.read(res, "stderr", 0, 100) == (b"kept", 4)


def test_read_edges(store: ResultStore) -> None:
    rid = complete(store, "alice", b"abcdef")
    res = store.get(rid, "alice")
    assert res is not None
    assert store.read(res, "stdout", 6, 10) == (b"", 6)
    assert store.read(res, "stdout", 1000, 10) == (b"", 6)
    assert store.read(res, "stdout", 2, 0) == (b"", 6)
    assert store.read(res, "stdout", 2, -5) == (b"", 6)
    assert store.read(res, "stdout", -3, 2) == (b"ab", 6)
    assert store.read(res, "stderr", 0, 10) == (b"", 0)
    with pytest.raises(ValueError):
        store.read(res, "../stdout", 0, 10)


def test_finish_is_idempotent_and_replaces_streams(store: ResultStore) -> None:
    rid = complete(store, "alice", b"first")
    store.finish(rid, status="exited", stdout=b"second", fields={"exit_code": 0})
    store.finish(rid, status="exited", stdout=b"second", fields={"exit_code": 0})
    assert read_all(store, rid, "alice", "stdout") == b"second"
    assert files_of(store, rid) == [f"{rid}.stderr", f"{rid}.stdout"]


# --- paging property -------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = ResultStore(tmp_path_factory.mktemp("paging"))
    yield s
    s.close()


def pages(store: ResultStore, rid: str, stream: str, page: int) -> tuple[bytes, set[int]]:
    """Page the stream as inspect_result's clients do: offset += len(data)."""
    got, offset, totals = b"", 0, set()
    for _ in range(10_000):
        res = store.get(rid, "alice")
        assert res is not None
        data, total = store.read(res, stream, offset, page)
        totals.add(total)
        assert len(data) <= page
        if not data:
            return got, totals
        got += data
        offset += len(data)
    raise AssertionError("paging did not end")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=700), max_size=8),
    page=st.integers(min_value=1, max_value=5000),
)
@pytest.mark.slow
def test_pages_reassemble_the_stream(shared_store: ResultStore, chunks: list[bytes], page: int) -> None:
    stream = b"".join(chunks)
    rid = begin(shared_store)
    w = shared_store.part_writer(rid, "stdout", 1 << 20)
    for c in chunks:
        w(c)
    assert pages(shared_store, rid, "stdout", page) == (stream, {len(stream)})
    w.close()
    # The final capture may differ from the live one (head + tail); page that too.
    final = stream[::-1] + b"!"
    shared_store.finish(rid, status="exited", stdout=final, fields={"exit_code": 0})
    assert pages(shared_store, rid, "stdout", page) == (final, {len(final)})


# --- scoping ---------------------------------------------------------------------------


def test_other_tenant_sees_not_found_like_a_random_id(store: ResultStore) -> None:
    rid = complete(store, "alice", b"secret")
    running = begin(store, "alice")
    assert store.get(rid, "alice") is not None
    for r in (rid, running):
        assert store.get(r, "bob") is None
        assert store.get(r, "") is None
        assert store.get(r, "%") is None
        assert store.get(r, "ALICE") is None
    assert store.get(store.new_id(), "alice") is None
    assert store.get(store.new_id(), "bob") is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../../x",
        "res_../../../etc/passwd",
        "../output/res_" + "0" * 32,
        "res_" + "0" * 31,
        "res_" + "0" * 33,
        "res_" + "A" * 32,
        "res_" + "0" * 32 + "\n",
        "res_" + "0" * 32 + "/x",
        "x res_" + "0" * 32,
        "res_%",
        "' OR '1'='1",
    ],
)
def test_malformed_ids_are_not_found_and_never_touch_the_filesystem(store: ResultStore, bad: str) -> None:
    assert store.get(bad, "alice") is None
    assert RESULT_ID_RE.match(bad) is None
    before = sorted(p for p in store.dir.rglob("*"))
    with pytest.raises(ValueError):
        store.part_writer(bad, "stdout", 10)
    with pytest.raises(ValueError):
        store.finish(bad, status="exited", stdout=b"x")
    assert sorted(p for p in store.dir.rglob("*")) == before


def test_a_real_id_with_a_trailing_newline_is_not_found(store: ResultStore) -> None:
    rid = complete(store, "alice", b"x")
    assert store.get(rid + "\n", "alice") is None
    with pytest.raises(ValueError):
        store.part_writer(rid + "\n", "stdout", 10)


def test_bad_stream_names_are_rejected(store: ResultStore) -> None:
    rid = begin(store)
    for stream in ("stdin", "../stdout", "stdout.part", ""):
        with pytest.raises(ValueError):
            store.part_writer(rid, stream, 10)


# --- restart ---------------------------------------------------------------------------


def test_a_reopened_store_sees_finished_results(state: Path, clock: Clock) -> None:
    first = ResultStore(state, clock=clock)
    rid = complete(first, "alice", BINARY, b"err\n")
    other = complete(first, "bob", b"bob's")
    before = first.get(rid, "alice")
    first.close()

    second = ResultStore(state, clock=clock)
    try:
        assert second.recover() == 0
        after = second.get(rid, "alice")
        assert after == before
        assert after is not None and after.status == "exited"
        assert read_all(second, rid, "alice", "stdout") == BINARY
        assert read_all(second, rid, "alice", "stderr") == b"err\n"
        assert second.get(other, "alice") is None
        assert read_all(second, other, "bob", "stdout") == b"bob's"
    finally:
        second.close()


def test_two_open_stores_share_results(state: Path) -> None:
    a, b = ResultStore(state), ResultStore(state)
    try:
        assert a.instance != b.instance
        rid = complete(a, "alice", b"from a")
        assert read_all(b, rid, "alice", "stdout") == b"from a"
    finally:
        a.close()
        b.close()


# --- recovery ----------------------------------------------------------------------------


def test_recover_spares_live_owners_and_marks_a_closed_owners_runs(state: Path) -> None:
    a, b = ResultStore(state), ResultStore(state)
    try:
        ra = begin(a, command="sleep 100")
        wa = a.part_writer(ra, "stdout", 1 << 20)
        wa(b"half of the output")
        rb = begin(b)
        # Both servers live: neither recovers the other's runs, nor its own.
        assert b.recover() == 0
        assert a.recover() == 0
        for s in (a, b):
            for rid in (ra, rb):
                res = s.get(rid, "alice")
                assert res is not None and res.status == "running" and res.error is None
        # A stops with a run still going (clean close, lock released).
        wa.close()
        a.close()
        assert b.recover() == 1
        res = b.get(ra, "alice")
        assert res is not None
        assert res.status == "error" and CRASH_REASON in (res.error or "")
        assert res.finished_at is not None
        assert b.read(res, "stdout", 0, 100) == (b"half of the output", 18)
        assert res.stdout_bytes == 18
        # start() made both part files (a full disk refuses the call before it runs)
        assert files_of(b, ra) == [f"{ra}.stderr", f"{ra}.stdout"]
        mine = b.get(rb, "alice")
        assert mine is not None and mine.status == "running"
        assert b.recover() == 0
    finally:
        b.close()


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gvisor_mcp.results import ResultStore

    s = ResultStore(Path(sys.argv[1]))
    rid = s.new_id()
    s.start(rid, tenant="alice", session=None, command="make -j8", container_id=None, limits=None)
    out = s.part_writer(rid, "stdout", 1 << 20)
    err = s.part_writer(rid, "stderr", 1 << 20)
    out(b"building\\x00\\n")
    err(b"warn\\n")
    print(rid, s.instance, flush=True)
    sys.stdin.read()  # run until killed
    """
)


@pytest.mark.slow
def test_a_crashed_servers_run_is_reported_as_error_after_restart(state: Path) -> None:
    state.mkdir(parents=True)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = child.stdout.readline().decode()  # type: ignore[union-attr]
        assert line, child.stderr.read().decode()  # type: ignore[union-attr]
        rid, instance = line.split()
        lock = state / "owners" / f"{instance}.lock"

        survivor = ResultStore(state)
        try:
            # The child is alive: its run is running and pages live.
            assert survivor.recover() == 0
            res = survivor.get(rid, "alice")
            assert res is not None and res.status == "running"
            assert survivor.read(res, "stdout", 0, 100) == (b"building\x00\n", 10)

            child.send_signal(signal.SIGKILL)
            child.wait()
            assert lock.exists()  # no cleanup ran: a real crash

            assert survivor.recover() == 1
            res = survivor.get(rid, "alice")
            assert res is not None
            assert res.status == "error" and CRASH_REASON in (res.error or "")
            assert survivor.read(res, "stdout", 0, 100) == (b"building\x00\n", 10)
            assert survivor.read(res, "stderr", 0, 100) == (b"warn\n", 5)
            assert (res.stdout_bytes, res.stderr_bytes) == (10, 5)
            assert not lock.exists()
            assert survivor.recover() == 0
        finally:
            survivor.close()

        # And after a full restart the error is still what is reported.
        again = ResultStore(state)
        try:
            res = again.get(rid, "alice")
            assert res is not None and res.status == "error"
            assert again.get(rid, "bob") is None
        finally:
            again.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_recovered_output_counts_toward_the_byte_budget(state: Path, clock: Clock) -> None:
    a = ResultStore(state, clock=clock)
    rid = begin(a)
    a.part_writer(rid, "stdout", 1 << 20)(b"x" * 80)
    a.close()
    clock.t += 1
    b = ResultStore(state, clock=clock, max_bytes_per_tenant=2 * ROW + 100)
    try:
        assert b.recover() == 1
        assert read_all(b, rid, "alice", "stdout") == b"x" * 80
        clock.t += 1
        newer = complete(b, "alice", b"y" * 30)  # 2 rows + 110 bytes in all: the recovered one goes
        assert b.get(rid, "alice") is None
        assert files_of(b, rid) == []
        assert read_all(b, newer, "alice", "stdout") == b"y" * 30
    finally:
        b.close()


# --- eviction ------------------------------------------------------------------------------


def test_evict_by_bytes_oldest_first_per_tenant(state: Path, clock: Clock) -> None:
    s = ResultStore(state, clock=clock, max_bytes_per_tenant=4 * ROW + 100)
    try:
        bob = []
        for _ in range(3):
            clock.t += 1
            bob.append(complete(s, "bob", b"b" * 30))  # 3 rows + 90 bytes: within budget
        alice = []
        for i in range(5):
            clock.t += 1
            alice.append(complete(s, "alice", bytes([65 + i]) * 20, b"e" * 10))  # a row + 30 each
        running = begin(s, "alice")
        s.part_writer(running, "stdout", 1 << 20)(b"r" * 500)
        # Already done after each finish; the running row's text counts, its
        # part file does not, and a running result is never evicted.
        assert s.evict("alice") == 0

        gone, kept = alice[:2], alice[2:]
        for rid in gone:
            assert s.get(rid, "alice") is None
            assert files_of(s, rid) == []
        for i, rid in enumerate(kept, start=2):
            assert read_all(s, rid, "alice", "stdout") == bytes([65 + i]) * 20
        for rid in bob:
            assert read_all(s, rid, "bob", "stdout") == b"b" * 30
        res = s.get(running, "alice")
        assert res is not None and res.status == "running"
        assert s.read(res, "stdout", 0, 1000)[1] == 500

        # Bob over his own budget loses his oldest; alice's are untouched.
        clock.t += 1
        bob.append(complete(s, "bob", b"c" * 30))
        assert s.get(bob[0], "bob") is None and files_of(s, bob[0]) == []
        assert all(s.get(r, "bob") is not None for r in bob[1:])
        assert all(s.get(r, "alice") is not None for r in kept)
    finally:
        s.close()


def test_evict_by_age(state: Path, clock: Clock) -> None:
    s = ResultStore(state, clock=clock, max_age_seconds=100)
    try:
        t0 = clock.t
        old_bob = complete(s, "bob", b"bob")
        rids = {}
        for age in (0, 50, 120):
            clock.t = t0 + age
            rids[age] = complete(s, "alice", f"at {age}".encode())
        # The run at 120 evicted the one at 0 (age 120) when it finished.
        assert s.get(rids[0], "alice") is None
        assert s.get(rids[50], "alice") is not None
        clock.t = t0 + 160
        assert s.evict("alice") == 1
        assert s.get(rids[0], "alice") is None and files_of(s, rids[0]) == []
        assert s.get(rids[50], "alice") is None and files_of(s, rids[50]) == []
        assert read_all(s, rids[120], "alice", "stdout") == b"at 120"
        # Bob is past the age too, but evict("alice") is alice's business.
        assert s.get(old_bob, "bob") is not None
        # recover() at server start applies the bounds to every tenant.
        assert s.recover() == 0
        assert s.get(old_bob, "bob") is None and files_of(s, old_bob) == []
        assert s.get(rids[120], "alice") is not None
    finally:
        s.close()


def test_a_long_run_is_not_evicted_for_its_age(state: Path, clock: Clock) -> None:
    s = ResultStore(state, clock=clock, max_age_seconds=10)
    try:
        rid = begin(s)
        clock.t += 1000
        assert s.evict("alice") == 0
        assert s.recover() == 0
        res = s.get(rid, "alice")
        assert res is not None and res.status == "running"
    finally:
        s.close()


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), st.integers(0, 60), st.integers(0, 20)),
        max_size=12,
    ),
    budget=st.integers(0, 5 * ROW),
)
@pytest.mark.slow
def test_eviction_keeps_each_tenants_newest_results_within_budget(
    runs: list[tuple[str, int, int]], budget: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        clock = Clock()
        s = ResultStore(Path(d), clock=clock, max_bytes_per_tenant=budget)
        try:
            made = []
            for tenant, out, err in runs:
                clock.t += 1
                made.append((tenant, complete(s, tenant, b"o" * out, b"e" * err), ROW + out + err))
            for tenant in ("alice", "bob"):
                mine = [(rid, size) for t, rid, size in made if t == tenant]
                # Model: the longest run of newest results whose sizes fit.
                kept, total = set(), 0
                for rid, size in reversed(mine):
                    total += size
                    if total > budget:
                        break
                    kept.add(rid)
                for rid, _ in mine:
                    assert (s.get(rid, tenant) is not None) == (rid in kept)
            on_disk = {p.name.split(".")[0] for p in s.out_dir.iterdir()}
            assert on_disk == {rid for t, rid, _ in made if s.get(rid, t) is not None}
        finally:
            s.close()


def test_store_files_stay_private(store: ResultStore) -> None:
    rid = complete(store, "alice", b"x")
    assert files_of(store, rid)
    assert os.stat(store.out_dir).st_mode & 0o077 == 0


def test_equal_timestamps_still_evict_the_oldest_first(state: Path, clock: Clock) -> None:
    s = ResultStore(state, clock=clock, max_bytes_per_tenant=2 * ROW + 20)
    try:
        rids = [complete(s, "alice", bytes([65 + i]) * 10) for i in range(3)]
        assert s.get(rids[0], "alice") is None
        assert [read_all(s, r, "alice", "stdout") for r in rids[1:]] == [b"B" * 10, b"C" * 10]
    finally:
        s.close()


# --- every byte counts (issue 14: 1 MiB commands with no output escaped eviction) -------------


def test_long_commands_are_stored_cut_and_count_toward_the_budget(state: Path, clock: Clock) -> None:
    s = ResultStore(state, clock=clock, max_bytes_per_tenant=10 * (ROW + 4400))
    try:
        command = "echo " + "z" * (1 << 20)
        rids = []
        for _ in range(30):
            clock.t += 1
            rids.append(begin(s, "alice", command))
            s.finish(rids[-1], status="exited", fields={"exit_code": 0})
            s.evict("alice")
        row = s.get(rids[-1], "alice")
        assert row is not None and len(row.command.encode()) < 4300
        assert row.command.startswith("echo zzz") and "1048581 bytes in all, sha256 " in row.command
        # No stream bytes at all, yet the oldest went: only the newest ~10 fit.
        alive = [r for r in rids if s.get(r, "alice") is not None]
        assert 5 <= len(alive) <= 10 and alive == rids[-len(alive) :]
        assert s.usage("alice") <= s.max_bytes_per_tenant
        s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert (state / "results.db").stat().st_size < 1 << 20  # was 36 MiB for 30 such runs
    finally:
        s.close()


def test_usage_counts_the_row_text_and_the_streams(store: ResultStore) -> None:
    assert store.usage("alice") == 0
    rid = complete(store, "alice", b"o" * 100, b"e" * 10)
    assert store.usage("alice") == ROW + 110
    assert store.usage("bob") == 0
    store.finish(rid, status="error", stdout=b"o" * 100, stderr=b"e" * 10, fields={"error": "boom"})
    assert store.usage("alice") == ROW + 110 + 4
