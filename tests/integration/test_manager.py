"""Manager.run on real runsc: what a caller sees, and that nothing is left behind.

Every test uses the `manager` fixture, which asserts after close() that the
test's private runsc root, bundle directory and cgroup parent are empty.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox import (
    ContainerOptions,
    ContainerStatus,
    InvalidOptionsError,
    Manager,
    ManagerClosedError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
)

from ..conftest import leftovers
from .conftest import make_config

pytestmark = pytest.mark.runsc


def sh(script: str, **kw) -> ContainerOptions:
    return ContainerOptions(command=["/bin/sh", "-c", script], **kw)


async def test_echo(manager):
    r = await manager.run(ContainerOptions(command=["echo", "hello", "world"]))
    assert r.status is ContainerStatus.EXITED
    assert r.exit_code == 0
    assert r.stdout == b"hello world\n"
    assert r.stderr == b""
    assert r.stdout_bytes == 12 and not r.stdout_truncated
    assert 0 < r.boot_duration < r.duration
    assert r.peak_memory_bytes > 1024 * 1024
    assert not r.oom_killed and r.signal is None
    assert r.container_id.startswith("gm-" + manager.instance + "-")


async def test_nonzero_exit_is_a_result(manager):
    r = await manager.run(sh("echo out; echo err >&2; exit 3"))
    assert (r.status, r.exit_code) == (ContainerStatus.EXITED, 3)
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")


async def test_stdin_env_workdir_and_user(manager):
    r = await manager.run(
        sh(
            "cat; echo; echo $FOO; pwd; id -u; id -g",
            stdin=b"from stdin",
            env={"FOO": "bar baz"},
            workdir="/tmp",
            user=UserSpec(uid=1000, gid=1000),
        )
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["from stdin", "bar baz", "/tmp", "1000", "1000"]


async def test_default_user_is_root_and_env_minimal(manager):
    r = await manager.run(sh("id -u; env | sort"))
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "0"
    keys = {line.split("=", 1)[0] for line in lines[1:]}
    # Nothing of the test process's environment leaks in.
    assert "PYTEST_CURRENT_TEST" not in keys and "PATH" in keys


async def test_default_image_has_no_host_secrets(manager):
    r = await manager.run(sh("ls /; cat /etc/passwd; ls /root /home /var 2>&1; test -e /etc/shadow && echo SHADOW"))
    out = r.stdout.decode()
    assert "SHADOW" not in out
    assert "sandbox:x:1000" in out
    assert "No such file" in out  # /root, /home, /var are absent
    r = await manager.run(ContainerOptions(command=["python3", "-c", "import sys; print(sys.version_info[0])"]))
    assert r.stdout == b"3\n", r.stderr


async def test_read_only_root(manager, tmp_path):
    r = await manager.run(sh("echo x > /file 2>&1; echo rc=$?", read_only_rootfs=True))
    assert b"rc=0" not in r.stdout
    # The writable default root keeps writes in sandbox memory, never on the host.
    r = await manager.run(sh("echo x > /file && cat /file"))
    assert r.stdout == b"x\n"


async def test_custom_rootfs_read_only_leaves_host_unchanged(manager, tmp_path):
    root = tmp_path / "img"
    (root / "data").mkdir(parents=True)
    (root / "data" / "f").write_text("original")
    opts = dict(
        rootfs=str(root),
        extra_mounts=[
            Mount(destination="/usr", source="/usr"),
            Mount(destination="/lib", source="/lib"),
            Mount(destination="/lib64", source="/lib64"),
            Mount(destination="/bin", source="/bin"),
        ],
    )
    for d in ("usr", "lib", "lib64", "bin", "proc", "dev", "sys"):
        (root / d).mkdir(exist_ok=True)
    r = await manager.run(sh("cat /data/f; echo changed > /data/f; echo rc=$?", read_only_rootfs=True, **opts))
    assert r.stdout.startswith(b"original")
    assert b"rc=0" not in r.stdout
    r = await manager.run(sh("echo changed > /data/f && cat /data/f", **opts))
    assert r.stdout == b"changed\n"
    assert (root / "data" / "f").read_text() == "original"


async def test_extra_mounts_ro_and_rw(manager, tmp_path):
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir(), rw.mkdir()
    (ro / "in").write_text("input")
    r = await manager.run(
        sh(
            "cat /in/in; echo x > /in/new 2>/dev/null && echo RO-WRITABLE; echo result > /out/file",
            extra_mounts=[
                Mount(destination="/in", source=str(ro)),
                Mount(destination="/out", source=str(rw), read_only=False),
                Mount(destination="/scratch", type="tmpfs", read_only=False, size_mb=8),
            ],
        )
    )
    assert r.stdout == b"input", r.stderr
    assert (rw / "file").read_text() == "result\n"
    assert not (ro / "new").exists()


async def test_timeout(manager):
    t = time.monotonic()
    r = await manager.run(ContainerOptions(command=["sleep", "30"], resources=ResourceSpec(timeout=1)))
    assert r.status is ContainerStatus.TIMED_OUT
    assert not r.oom_killed
    assert time.monotonic() - t < 10
    assert r.signal == 9


async def test_oom(manager):
    r = await manager.run(
        ContainerOptions(
            command=["python3", "-c", "x = bytearray(1 << 30); print('survived')"],
            resources=ResourceSpec(memory_mb=128, timeout=60),
        )
    )
    assert r.status is ContainerStatus.OOM_KILLED, r.summary()
    assert r.oom_killed
    assert b"survived" not in r.stdout
    limit = 128 * 1024 * 1024
    assert 0.5 * limit < r.peak_memory_bytes <= limit * 1.01


@pytest.mark.parametrize(
    "script, code, sig",
    [
        # exit 137 of its own accord, after taking most of its memory limit
        ("python3 -c 'import sys; x = bytearray(100 << 20); sys.exit(137)'", 137, 9),
        # a child dies of SIGKILL / SIGSEGV sent by the command itself: no OOM anywhere
        ("python3 -c 'import os; x = bytearray(100 << 20); os.kill(os.getpid(), 9)'; exit $?", 137, 9),
        ("python3 -c 'import os; os.kill(os.getpid(), 11)'; exit $?", 139, 11),
        ("sleep 60 & kill -KILL $!; wait $!", 137, 9),
    ],
)
async def test_exit_137_or_death_by_a_signal_is_not_an_oom_kill(manager, script, code, sig):
    """Code that called every exit status 137 an OOM kill passed all the other
    tests of this file (cold and warm): 137 is also `exit 137` and SIGKILL."""
    r = await manager.run(sh(script, resources=ResourceSpec(memory_mb=128, timeout=60)))
    assert (r.status, r.exit_code, r.signal) == (ContainerStatus.EXITED, code, sig), r.summary()
    assert not r.oom_killed, r.summary()


async def test_timed_out_memory_heavy_is_not_oom(manager):
    r = await manager.run(
        ContainerOptions(
            command=["python3", "-c", "import time; x = bytearray(60 << 20); time.sleep(30)"],
            resources=ResourceSpec(memory_mb=256, timeout=2),
        )
    )
    assert r.status is ContainerStatus.TIMED_OUT, r.summary()
    assert not r.oom_killed
    assert r.peak_memory_bytes > 60 << 20


async def test_fork_bomb_is_contained(manager):
    r = await manager.run(sh("b(){ b|b& }; b; sleep 2; echo done", resources=ResourceSpec(max_pids=64, timeout=20)))
    assert r.status in (ContainerStatus.EXITED, ContainerStatus.TIMED_OUT), r.summary()
    # The host is fine: a normal run works right after.
    r = await manager.run(ContainerOptions(command=["true"]))
    assert (r.status, r.exit_code) == (ContainerStatus.EXITED, 0)


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_flood_is_truncated_head_and_tail(manager):
    cap = 1 << 20
    script = "printf HEAD; head -c 200000000 /dev/zero; printf TAIL"
    chunks: list[int] = []
    _peak_rss_reset()
    before = _peak_rss()
    r = await manager.run(
        sh(
            script,
            resources=ResourceSpec(max_output_bytes=cap, timeout=120),
            stdout_writer=lambda c: chunks.append(len(c)),
        )
    )
    assert r.exit_code == 0, r.summary()
    assert r.stdout_bytes == 200_000_008
    assert r.stdout_truncated
    assert len(r.stdout) == cap
    assert r.stdout.startswith(b"HEAD\0") and r.stdout.endswith(b"\0TAIL")
    assert sum(chunks) == r.stdout_bytes
    # 200 MB went through; the process grew by about the cap, not the flood.
    assert _peak_rss() - before < cap + 32 * 1024 * 1024


async def test_network_none_reaches_nothing(manager):
    script = (
        "import socket\n"
        "for host, port in [('1.1.1.1', 53), ('127.0.0.1', 22), ('10.0.0.1', 80)]:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((host, port)); print('CONNECTED', host)\n"
        "    except OSError as e:\n"
        "        print('refused', host, type(e).__name__)\n"
    )
    r = await manager.run(ContainerOptions(command=["python3", "-c", script], network=NetworkMode.NONE))
    assert b"CONNECTED" not in r.stdout
    assert r.stdout.count(b"refused") == 3, r.stderr


async def test_concurrency_limit_waits(sandbox_base):
    peak = 0
    async with Manager(make_config(sandbox_base, max_concurrent_containers=2)) as m:

        async def one():
            await m.run(ContainerOptions(command=["sleep", "1"]))

        async def watch():
            nonlocal peak
            for _ in range(100):
                peak = max(peak, m.active_containers())
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for _ in range(5):
                tg.start_soon(one)
    assert peak == 2
    assert leftovers(sandbox_base) == {}


async def test_close_during_run_kills_and_refuses_new_runs(sandbox_base):
    results = []
    async with Manager(make_config(sandbox_base)) as m:

        async def long():
            results.append(await m.run(ContainerOptions(command=["sleep", "60"])))

        t = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            while m.active_containers() == 0:
                await anyio.sleep(0.01)
            await anyio.sleep(0.5)
            await m.close()
            await m.close()  # idempotent
        assert time.monotonic() - t < 10
        assert results[0].status is ContainerStatus.KILLED
        with pytest.raises(ManagerClosedError):
            await m.run(ContainerOptions(command=["true"]))
    assert leftovers(sandbox_base) == {}


async def test_cancelling_the_caller_kills_the_container(manager):
    with anyio.move_on_after(1.0) as scope:
        await manager.run(ContainerOptions(command=["sleep", "60"]))
    assert scope.cancelled_caught
    assert manager.active_containers() == 0
    # the fixture checks that nothing is left behind


async def test_kill_by_id(manager):
    result = []

    async def go():
        result.append(await manager.run(ContainerOptions(command=["sleep", "60"])))

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        while not manager.active_runs():
            await anyio.sleep(0.01)
        await anyio.sleep(0.3)
        assert await manager.kill(manager.active_runs()[0].run_id)
    assert result[0].status is ContainerStatus.KILLED


@pytest.mark.parametrize(
    "opts, field",
    [
        (dict(command=["sh", "-c", "true"], workdir="/does/not/exist"), "workdir"),
        (dict(command=["true"], rootfs="/nonexistent/rootfs"), "rootfs"),
        (dict(command=["true"], extra_mounts=[Mount(destination="/x", source="/nonexistent")]), "mount.source"),
    ],
)
async def test_bad_input_fails_before_any_container(manager, sandbox_base, opts, field):
    with pytest.raises(InvalidOptionsError) as e:
        await manager.run(ContainerOptions(**opts))
    assert e.value.field == field
    assert leftovers(sandbox_base) == {}


async def test_network_sandbox_is_refused_clearly(manager):
    with pytest.raises(InvalidOptionsError, match="network"):
        await manager.run(ContainerOptions(command=["true"], network=NetworkMode.SANDBOX))


async def test_an_error_in_the_async_with_body_propagates_as_itself(sandbox_base):
    """Not wrapped in the Manager's task group's ExceptionGroup; nothing left."""
    with pytest.raises(KeyError, match="the caller's"):
        async with Manager(make_config(sandbox_base)) as m:
            await m.run(ContainerOptions(command=["true"]))
            raise KeyError("the caller's")
    assert m.closed
    assert leftovers(sandbox_base) == {}
