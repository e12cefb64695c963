"""Jobs: every command ends in the result store, whatever happens to it."""

from __future__ import annotations

import anyio
import pytest

from gvisor_mcp.jobs import CallRate, QuotaExceeded
from gvisor_mcp.sandbox import ContainerOptions, InvalidOptionsError
from gvisor_mcp.text import command_sha256


def start(srv, command: str, tenant: str = "alice"):  # type: ignore[no-untyped-def]
    return srv.rt.jobs.start(
        tenant=tenant,
        session=None,
        command=command,
        options=ContainerOptions(command=("/bin/sh", "-c", command)),
        limits={"x": 1},
    )


async def finished(job):  # type: ignore[no-untyped-def]
    with anyio.fail_after(10):
        await job.done.wait()
    return job


async def test_a_finished_job_is_stored_and_audited_with_the_whole_commands_hash(fast):
    long_command = "echo " + "y" * 10_000
    async with fast() as srv:
        srv.fake.script("false", exit_code=3, stderr=b"nope\n")
        job = await finished(start(srv, "false"))
        stored = srv.rt.store.get(job.result_id, "alice")
        assert (stored.status, stored.exit_code, stored.stderr_bytes) == ("exited", 3, 5)
        assert stored.limits == {"x": 1} and stored.container_id == "fake-0001"
        assert srv.rt.store.get(job.result_id, "bob") is None
        assert srv.rt.store.read(stored, "stderr", 0, 100) == (b"nope\n", 5)
        await finished(start(srv, long_command))
    lines = srv.audit()
    assert [(a["status"], a["exit_code"]) for a in lines] == [("exited", 3), ("exited", 0)]
    assert len(lines[1]["command"]) < len(long_command)  # cut in the audit line...
    assert lines[1]["command_bytes"] == len(long_command)  # ...but its size and hash are whole
    assert lines[1]["command_sha256"] == command_sha256(long_command)


async def test_cancel_while_waiting_for_a_slot(fast):
    async with fast(capacity=1) as srv:
        srv.fake.script("hold", block=True)
        first = start(srv, "hold")
        with anyio.fail_after(10):
            while srv.fake.active_containers() == 0:
                await anyio.sleep(0.01)
        waiting = start(srv, "echo later", tenant="bob")
        await anyio.sleep(0.05)
        assert not waiting.done.is_set() and srv.rt.jobs.gate.waiting() == 1
        await srv.rt.jobs.cancel(waiting)
        await finished(waiting)
        assert (waiting.status, waiting.error) == ("killed", "cancelled before a sandbox was free to run it")
        assert srv.rt.store.get(waiting.result_id, "bob").status == "killed"
        assert not first.done.is_set()
        await srv.rt.jobs.cancel(first)
        await finished(first)
        assert first.status == "killed" and srv.rt.jobs.active_all() == []


async def test_cancel_before_the_jobs_task_began_stops_it_without_running_it(fast):
    """cancel_command right after start, before the job's task has run once:
    the cancel is kept (it used to be lost: cancel waited 3 x kill_grace for
    nothing, then the command ran anyway)."""
    async with fast() as srv:
        srv.fake.script("hold", block=True)
        job = start(srv, "hold")
        assert job.container_id is None and srv.fake.active_containers() == 0
        await srv.rt.jobs.cancel(job)
        await finished(job)
        assert (job.status, job.error) == ("killed", "cancelled before a sandbox was free to run it")
        assert srv.rt.store.get(job.result_id, "alice").status == "killed"
        assert srv.fake.runs == [] and srv.rt.jobs.active_all() == [] and srv.rt.jobs.gate.used == 0


@pytest.mark.parametrize(
    ("raises", "status", "error"),
    [
        (InvalidOptionsError("memory_mb", 1, "at least 16"), "error", "memory_mb"),
        (RuntimeError("a bug"), "error", "internal error: RuntimeError"),
    ],
)
async def test_a_run_that_raises_still_ends_in_a_stored_result(fast, raises, status, error):
    async with fast() as srv:
        srv.fake.script("x", raises=raises)
        job = await finished(start(srv, "x"))
        stored = srv.rt.store.get(job.result_id, "alice")
        assert stored.status == status and error in stored.error
        assert srv.rt.jobs.active_all() == []


async def test_a_run_after_shutdown_began_is_killed_and_says_why(fast):
    async with fast() as srv:
        await srv.fake.close()
        job = await finished(start(srv, "echo late"))
        assert job.status == "killed" and "shut down before the command could start" in job.error


async def test_admission_counts_running_jobs_per_tenant(fast):
    async with fast() as srv:
        srv.fake.script("hold", block=True)
        job = start(srv, "hold")
        with anyio.fail_after(10):
            while srv.fake.active_run(job.result_id) is None:
                await anyio.sleep(0.01)
        with pytest.raises(QuotaExceeded, match="max_concurrent=1"):
            srv.rt.jobs.admit("alice", 1)
        srv.rt.jobs.admit("bob", 1)
        srv.rt.jobs.admit("alice", None)
        await srv.rt.jobs.cancel(job)


def test_the_call_rate_window_slides():
    now = [1000.0]
    rate = CallRate(clock=lambda: now[0])
    for _ in range(3):
        rate.count("a", 3)
    with pytest.raises(QuotaExceeded, match=r"runs_per_minute=3\); retry in 60 s"):
        rate.count("a", 3)
    rate.count("b", 3)  # per tenant
    now[0] += 59.5
    with pytest.raises(QuotaExceeded, match="retry in 1 s"):
        rate.count("a", 3)
    now[0] += 0.5
    rate.count("a", 3)  # the first three left the window
    rate.count("a", None)  # no limit
