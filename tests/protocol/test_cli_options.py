"""`gvisor-mcp` options every command shares, usage errors, and `run`'s default user (issue 15, CLI).

The installed `gvisor-mcp` runs in a subprocess, as an operator types it.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata

import pytest

from ..conftest import CGROUP_PARENT, leftovers
from .conftest import BIN

ENV = {"PATH": os.environ["PATH"]}

INITIALIZE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
    )
    + "\n"
)


def gm(*argv: str, env: dict | None = None, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *argv], input=stdin, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}
    )


def test_version_prints_the_package_version() -> None:
    r = gm("--version")
    assert r.returncode == 0 and r.stdout == f"gvisor-mcp {metadata.version('gvisor-mcp')}\n", r
    assert r.stderr == ""


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bogus"], "gvisor-mcp: unknown option '--bogus' before the command"),
        (["serve", "--bogus"], "gvisor-mcp serve: unrecognized arguments: --bogus; see `gvisor-mcp serve --help`"),
        (["token", "add", "--nope", "t"], "gvisor-mcp token add: unrecognized arguments: --nope"),
        (
            ["run", "--memory-mb", "lots", "--", "true"],
            "gvisor-mcp run: argument --memory-mb: invalid int value: 'lots'",
        ),
        (["frobnicate"], "gvisor-mcp: argument COMMAND: invalid choice: 'frobnicate'"),
        ([], "gvisor-mcp: the following arguments are required: COMMAND"),
        (["--log-level"], "gvisor-mcp: --log-level needs a value, one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        (["--log-level", "LOUD", "doctor"], "gvisor-mcp: --log-level: log level 'LOUD' is not one of DEBUG, INFO"),
        (["doctor", "--log-level", "LOUD"], "gvisor-mcp: --log-level: log level 'LOUD' is not one of"),
        (["policy", "check"], "gvisor-mcp policy check: the following arguments are required: FILE"),
        (["policy", "check", "--bogus", "f.yaml"], "gvisor-mcp policy: unrecognized arguments: --bogus"),
        (["image", "frob"], "gvisor-mcp image: argument action: invalid choice: 'frob'"),
    ],
)
def test_a_bad_command_line_gets_one_clear_line_and_status_2(argv: list[str], says: str) -> None:
    r = gm(*argv)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr.startswith(says) and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "usage:" not in r.stderr


def test_a_bad_log_level_in_the_environment_is_one_line_too() -> None:
    r = gm("policy", "schema", env={"GVISOR_MCP_LOG_LEVEL": "chatty"})
    assert r.returncode == 2 and r.stderr == (
        "gvisor-mcp: GVISOR_MCP_LOG_LEVEL: log level 'chatty' is not one of DEBUG, INFO, WARNING, ERROR, "
        "CRITICAL (case does not matter)\n"
    ), r.stderr


def serve_once(base, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Start `serve` on stdio, send initialize, close stdin: the server answers, then stops."""
    i = argv.index("serve") if "serve" in argv else -1
    before, after = list(argv[: max(i, 0)]), list(argv[i + 1 :])
    return gm(
        *before,
        "serve",
        "--state-root",
        str(base),
        "--cgroup-parent",
        CGROUP_PARENT,
        "--state-dir",
        str(base / "state"),
        "--pool-size",
        "0",
        *after,
        stdin=INITIALIZE,
        env=env,
    )


def log_levels(stderr: str) -> list[str]:
    return [json.loads(line)["level"] for line in stderr.splitlines()]


@pytest.mark.runsc
def test_log_level_is_honoured_by_serve_before_or_after_the_command_and_from_the_environment(sandbox_base) -> None:
    # The default for serve is INFO: the operator's log shows it starting and stopping.
    r = serve_once(sandbox_base)
    assert r.returncode == 0 and '"serverInfo"' in r.stdout, r.stderr
    assert "info" in log_levels(r.stderr), r.stderr
    # Issue 15: `--log-level ERROR serve` still logged INFO (serve configured logging a second time).
    for argv, env in (
        (("--log-level", "ERROR", "serve"), None),
        (("serve", "--log-level", "error"), None),
        (("serve",), {"GVISOR_MCP_LOG_LEVEL": "ERROR"}),
        (("--log-level", "ERROR", "serve"), {"GVISOR_MCP_LOG_LEVEL": "DEBUG"}),  # the flag wins
    ):
        r = serve_once(sandbox_base, *argv, env=env)
        assert r.returncode == 0 and '"serverInfo"' in r.stdout, (argv, r.stderr)
        assert r.stderr == "", (argv, env, r.stderr)
    assert leftovers(sandbox_base) == {}


def run_cli(base, *argv: str) -> subprocess.CompletedProcess:
    return gm("run", "--state-root", str(base), "--cgroup-parent", CGROUP_PARENT, *argv)


@pytest.mark.runsc
def test_run_uses_the_policys_user_unless_told_otherwise(sandbox_base, tmp_path) -> None:
    r = run_cli(sandbox_base, "--", "id", "-u")
    assert r.returncode == 0 and r.stdout == "1000\n", r.stderr  # the built-in policy's defaults.user
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: 1\ndefaults:\n  user: "2345:2346"\n')
    r = run_cli(sandbox_base, "--policy", str(policy), "--", "/bin/sh", "-c", "echo $(id -u):$(id -g)")
    assert r.returncode == 0 and r.stdout == "2345:2346\n", r.stderr
    r = run_cli(sandbox_base, "--user", "0", "--policy", str(policy), "--", "id", "-u")
    assert r.returncode == 0 and r.stdout == "0\n", r.stderr  # the operator may still ask for root
    r = run_cli(sandbox_base, "--policy", str(policy), "--tenant", "nobody-here", "--", "id")
    assert r.returncode == 2 and r.stderr == (
        "gvisor-mcp: tenant 'nobody-here' is not defined in the policy; defined tenants: default\n"
    ), r.stderr
    assert leftovers(sandbox_base) == {}


@pytest.mark.runsc
def test_a_long_run_shows_elapsed_time_and_bytes_on_a_terminal_and_nothing_extra_otherwise(sandbox_base) -> None:
    import pty
    import re

    argv = [
        str(BIN),
        "run",
        "--state-root",
        str(sandbox_base),
        "--cgroup-parent",
        CGROUP_PARENT,
        "--",
        "/bin/sh",
        "-c",
        "echo start; sleep 5; printf partial; sleep 2; echo; echo oops >&2",
    ]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=ENV)
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        stdout = proc.stdout.read()
        assert proc.wait(timeout=120) == 0, screen
    finally:
        os.close(master)
    assert stdout == b"start\npartial\n"
    text = screen.decode()
    # While it ran: the line, redrawn in place, with the bytes so far.
    shown = re.findall(r"\r\x1b\[Kgvisor-mcp: running (\d+\.\d)s, stdout (\d+ B), stderr (\d+ B)", text)
    assert ("6 B", "0 B") in [(o, e) for _, o, e in shown], text
    assert [float(t) for t, _, _ in shown] == sorted(float(t) for t, _, _ in shown)
    # Never in the middle of the command's own line ("partial" had no newline yet) ...
    assert "partial\x1b" not in text and "partialgvisor" not in text
    # ... erased before the command's stderr and before the summary.
    assert re.search(r"(\n|\r\x1b\[K)oops\r?\n", text), text
    assert re.search(r"(\n|\r\x1b\[K)gvisor-mcp: status=exited exit_code=0 ", text), text
    assert leftovers(sandbox_base) == {}

    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0 and b"running" not in r.stderr and b"\x1b" not in r.stderr
    assert r.stderr.startswith(b"oops\ngvisor-mcp: status=exited exit_code=0 "), r.stderr
    assert leftovers(sandbox_base) == {}


@pytest.mark.runsc
def test_ctrl_c_stops_a_run_with_one_line_and_leaves_nothing(sandbox_base) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [str(BIN), "run", "--state-root", str(sandbox_base), "--cgroup-parent", CGROUP_PARENT, "--", "sleep", "300"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job has it
    )
    try:
        deadline = time.monotonic() + 120
        while "runsc list" not in leftovers(sandbox_base):
            assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err == b"gvisor-mcp: interrupted; the command was stopped and its sandbox removed\n", err
    assert leftovers(sandbox_base) == {}
