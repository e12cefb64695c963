"""RunProcess signals the runsc client without stealing its exit status from asyncio."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox.runsc import RunProcess


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("how", ["kill", "terminate", "send_signal"])
async def test_signalling_a_client_that_just_exited_keeps_its_exit_status(monkeypatch, how):
    """FakeSlowReaper: asyncio's watcher thread reaps 0.5 s late, as on a loaded host where the
    woken thread waits for a CPU. Popen.send_signal's poll used to reap the child first: the
    watcher then logged "Unknown child process pid" and the client's status read 255, not 7."""
    real_waitpid = os.waitpid

    def slow_waitpid(pid: int, options: int) -> tuple[int, int]:
        if options == 0:  # the watcher's blocking wait (subprocess's own poll bound os.waitpid at import)
            time.sleep(0.5)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", slow_waitpid)
    proc = await anyio.open_process(["sh", "-c", "exit 7"])
    client = RunProcess(proc, None, None)  # type: ignore[arg-type]  # no output pipes needed here
    with anyio.fail_after(10):
        while not _zombie(proc.pid):  # exited, not yet reaped by the (slow) watcher
            await anyio.sleep(0.01)
    if how == "send_signal":
        client.send_signal(9)
    else:
        getattr(client, how)()
    with anyio.fail_after(10):
        assert await client.wait() == 7
    client.kill()  # after the exit: nothing to signal, no error
    await proc.aclose()


@pytest.mark.runsc
async def test_a_runsc_command_whose_caller_is_cancelled_still_ends_with_its_own_status(monkeypatch, tmp_path, caplog):
    """A timed-out run's `runsc kill` was still in flight when the killed client's exit cancelled
    the deadline task: anyio closed asyncio's transport, whose poll reaped `runsc kill` ahead of
    the watcher ("Unknown child process pid N, will report returncode 255", 18 times in the
    soak). The call is shielded now: it ends, the watcher reaps it, the caller gets its status.
    FakeSlowReaper (as above) keeps the finished command unreaped when the caller is cancelled."""
    from gvisor_mcp.sandbox.runsc import Runsc

    real_waitpid = os.waitpid

    def slow_waitpid(pid: int, options: int) -> tuple[int, int]:
        if options == 0:
            time.sleep(3)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", slow_waitpid)
    runsc = Runsc("runsc", str(tmp_path / "root"))
    got = []
    with anyio.move_on_after(1):  # `runsc list` has ended by then; the watcher reaps it at 3 s
        got.append(await runsc._call(["list", "--quiet"]))
    assert [rc for rc, _, _ in got] == [0], got
    assert not [r for r in caplog.records if "Unknown child process" in r.getMessage()]
