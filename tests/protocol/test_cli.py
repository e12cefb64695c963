"""The `run`, `doctor` and `cleanup` commands, as an operator types them (real runsc).

Each runs the installed `gvisor-mcp` in a subprocess on this test's private
state root and cgroup parent; the `sandbox_base` fixture's teardown is
checked here too: nothing left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import BIN

pytestmark = pytest.mark.runsc

ENV = {"PATH": os.environ["PATH"]}


def cli(base, *argv: str, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd, rest = argv[0], argv[1:]
    return subprocess.run(
        [str(BIN), cmd, "--state-root", str(base), "--cgroup-parent", CGROUP_PARENT, *rest],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=ENV,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def test_run_streams_output_and_returns_the_commands_exit_code(sandbox_base):
    r = cli(
        sandbox_base,
        "run",
        "--memory-mb",
        "128",
        "-e",
        "WHO=cli",
        "--",
        "/bin/sh",
        "-c",
        "cat; echo out $WHO; echo err >&2; exit 3",
        stdin=b"from stdin\n",
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"from stdin\nout cli\n"
    err = r.stderr.decode()
    assert err.startswith("err\ngvisor-mcp: status=exited exit_code=3 "), err
    assert leftovers(sandbox_base) == {}


def test_run_reports_a_timeout_and_refuses_bad_arguments(sandbox_base):
    r = cli(sandbox_base, "run", "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 137, (r.returncode, r.stderr)
    assert b"gvisor-mcp: status=timed_out exit_code=137 signal=9 " in r.stderr, r.stderr
    r = cli(sandbox_base, "run", "-e", "NOEQUALS", "--", "true")
    assert r.returncode == 2 and b"--env 'NOEQUALS': expected KEY=VALUE" in r.stderr, r.stderr
    r = cli(sandbox_base, "run", "--network", "bridge", "--", "true")
    assert r.returncode == 2 and b"--network 'bridge': expected one of none, sandbox, host" in r.stderr
    assert leftovers(sandbox_base) == {}


def test_doctor_passes_here_and_fails_clearly_without_runsc(sandbox_base):
    r = cli(sandbox_base, "doctor")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    for what in ("root", "runsc", "runsc version", "cgroups", "canary (ls -l / in a sandbox)"):
        assert f"ok   {what}: " in out, out
    r = cli(sandbox_base, "doctor", "--runsc", "/nonexistent/runsc")
    out = r.stdout.decode()
    assert r.returncode == 1 and "FAIL runsc: '/nonexistent/runsc' not found: run scripts/setup.sh" in out, out
    assert "canary" not in out  # it stops before trying a sandbox
    assert leftovers(sandbox_base) == {}


def test_cleanup_removes_what_a_killed_run_left(sandbox_base):
    proc = subprocess.Popen(
        [str(BIN), "run", "--state-root", str(sandbox_base), "--cgroup-parent", CGROUP_PARENT, "--", "sleep", "300"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while "runsc list" not in leftovers(sandbox_base):
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # the owner dies; its sandbox stays
        proc.wait()
        time.sleep(0.5)
        left = leftovers(sandbox_base)
        assert left.get("runsc list") or left.get("processes"), left
        r = cli(sandbox_base, "cleanup")
        out = r.stdout.decode()
        assert r.returncode == 0, out + r.stderr.decode()
        assert "1 stale container(s) removed" in out and out.startswith("removed gm-"), out
        assert leftovers(sandbox_base) == {}
        r = cli(sandbox_base, "cleanup")  # nothing more to do, and it says so
        assert r.returncode == 0 and r.stdout.decode() == "0 stale container(s) removed\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
