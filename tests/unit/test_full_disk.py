"""A full state disk, for real: the store, the audit log and a run's finish on an 8 MiB tmpfs.

Issue 14, finding 1: `Jobs._finish` -> `audit.write` raised ENOSPC out of the
job task and the whole server exited. Here every write the state directory
takes meets a full disk: nothing raises out of a job, the call is refused or
told plainly, nothing already stored is lost, and everything works again
once there is room. (tests/adversarial/test_resources.py drives the same
through the real server.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gvisor_mcp.audit import AuditLog
from gvisor_mcp.jobs import Job, Jobs
from gvisor_mcp.results import ResultStore, StoreUnavailable
from gvisor_mcp.sandbox import ContainerResult, ContainerStatus, ManagerConfig

from ..conftest import fill_disk


def finished(store: ResultStore, tenant: str, out: bytes) -> str:
    rid = store.new_id()
    store.start(rid, tenant=tenant, session=None, command="echo", container_id=None, limits=None)
    store.finish(rid, status="exited", stdout=out, fields={"exit_code": 0, "stdout_bytes": len(out)})
    return rid


def test_a_run_cannot_start_on_a_full_disk_and_leaves_nothing(small_tmpfs: Path) -> None:
    store = ResultStore(small_tmpfs)
    try:
        kept = finished(store, "alice", b"kept\n")
        filler = fill_disk(small_tmpfs)
        rid = store.new_id()
        with pytest.raises(StoreUnavailable, match="full|No space"):
            for _ in range(50):  # SQLite may still fit a row or two in its last page
                rid = store.new_id()
                store.start(rid, tenant="alice", session=None, command="x" * 3000, container_id=None, limits=None)
        assert store.get(rid, "alice") is None
        assert not any(p.name.startswith(rid) for p in store.out_dir.iterdir())
        assert store.read(store.get(kept, "alice"), "stdout", 0, 100) == (b"kept\n", 5)  # type: ignore[arg-type]
        filler.unlink()
        again = finished(store, "alice", b"again\n")
        assert store.get(again, "alice").status == "exited"  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_run_that_ends_on_a_full_disk_is_recorded_as_far_as_it_can_be(small_tmpfs: Path) -> None:
    store = ResultStore(small_tmpfs)
    audit = AuditLog(small_tmpfs / "audit.jsonl")
    jobs = Jobs(SimpleNamespace(config=ManagerConfig()), store, audit, None)  # type: ignore[arg-type]
    try:
        kept = finished(store, "alice", b"kept\n")
        rid = store.new_id()
        job = Job(result_id=rid, tenant="alice", session=None, command="yes | head -c 1M", limits={}, timeout=30)
        store.start(rid, tenant="alice", session=None, command=job.command, container_id=None, limits={})
        writers = (store.part_writer(rid, "stdout", 1 << 20), store.part_writer(rid, "stderr", 1 << 20))
        filler = fill_disk(small_tmpfs)
        writers[0](b"y\n" * 1000)  # the live part file cannot grow: no exception either
        result = ContainerResult(
            container_id="gm-x",
            exit_code=0,
            stdout=b"y\n" * (1 << 19),
            stderr=b"",
            stdout_bytes=1 << 20,
            stderr_bytes=0,
            duration=1.0,
            boot_duration=0.1,
            status=ContainerStatus.EXITED,
        )
        jobs._finish(job, result, "exited", None, writers, "sha")  # must not raise
        assert job.done.is_set() and jobs.active_all() == []
        row = store.get(rid, "alice")
        assert row is not None
        if row.status == "running":  # not even the row could be updated: kept and said
            assert jobs.unstored(rid, "alice") is job and jobs.unstored(rid, "bob") is None
            assert "could not store its result" in (job.store_error or "")
            assert "status exited, exit code 0" in (job.store_error or "")
        else:  # the row without its output, saying so
            assert "could not store this command's output" in (row.error or "")
        filler.unlink()
        jobs._retry_unstored()
        row = store.get(rid, "alice")
        assert row is not None and row.status == "exited" and row.exit_code == 0
        assert "could not store this command's output" in (row.error or "")
        assert jobs.unstored(rid, "alice") is None
        audit.writable()  # the run's audit line went out once there was room
        assert f'"result_id":"{rid}"' in (small_tmpfs / "audit.jsonl").read_text()
        assert store.read(store.get(kept, "alice"), "stdout", 0, 100) == (b"kept\n", 5)  # type: ignore[arg-type]
    finally:
        store.close()
        audit.close()
