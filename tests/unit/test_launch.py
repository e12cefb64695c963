"""The launcher in front of `runsc run` (runsc.Launch): what it composes,
what runsc's argv then says, and what a failing step leaves for the run to
report. The launcher is run for real with /bin/sh (no runsc needed: it
execs whatever follows, here `cat` or `echo`); the cgroup v2 leaf is a FAKE
tree in a temp directory (these machines have v1 only)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gvisor_mcp.sandbox.cgroups import Cgroup
from gvisor_mcp.sandbox.container import _runsc_error
from gvisor_mcp.sandbox.options import NetworkMode
from gvisor_mcp.sandbox.runsc import (
    GO_NULL,
    GO_PIPE,
    LAUNCHER_FAILED,
    PROC_SYS_NET_COVER,
    Launch,
    Runsc,
    go_line,
    launcher_argv,
    meminfo_mount,
    meminfo_text,
)


def runsc() -> Runsc:
    return Runsc("sh", "/run/x")  # any binary on PATH: only argv is built


def test_empty_launch_is_runsc_itself_as_before():
    argv = runsc().run_argv("c1", "/b", NetworkMode.NONE, "/b/log")
    assert argv[0].endswith("/sh") and "--ignore-cgroups" not in argv
    assert argv[-4:] == ["run", "--bundle=/b", "--", "c1"]


def test_joining_cgroups_adds_ignore_cgroups_and_a_shell_but_no_namespace():
    launch = Launch(join_cgroups=("/sys/fs/cgroup/memory/p/c1/cgroup.procs",))
    argv = runsc().run_argv("c1", "/b", NetworkMode.NONE, "/b/log", launch)
    assert argv[:2] == ["/bin/sh", "-c"]
    assert "echo 0 > /sys/fs/cgroup/memory/p/c1/cgroup.procs" in argv[2]
    assert argv[2].rstrip().endswith('exec "$0" "$@"')
    rest = argv[3:]
    assert rest[0].endswith("/sh") and "--ignore-cgroups" in rest
    assert rest.index("--ignore-cgroups") < rest.index("run")


def test_mounts_run_in_a_private_mount_namespace_and_compose_with_the_join():
    launch = Launch(
        join_cgroups=("/a/cgroup.procs", "/b/cgroup.procs"), mounts=(meminfo_mount("/m"), PROC_SYS_NET_COVER)
    )
    argv = launcher_argv(launch, "/log")
    assert argv[:4] == ["unshare", "--mount", "--propagation", "private"]
    script = argv[6]
    order = [
        script.index(s) for s in ("/a/cgroup.procs", "/b/cgroup.procs", "/m /proc/meminfo", "/proc/sys/net", "exec")
    ]
    assert order == sorted(order)  # joins first, then mounts, then runsc


def test_meminfo_file_is_what_runsc_parses():
    assert meminfo_text(512 * 1024 * 1024) == "MemTotal: 524288 kB\n"


def test_the_launcher_execs_the_rest_with_its_arguments_intact(tmp_path):
    argv = launcher_argv(Launch(join_cgroups=(str(tmp_path / "procs"),)), str(tmp_path / "log"))
    r = subprocess.run([*argv, "/bin/echo", "a b", "$HOME", "'"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "a b $HOME '\n")
    assert (tmp_path / "procs").read_text() == "0\n"  # a plain file stands in for cgroup.procs


@pytest.mark.parametrize("bad", ["join", pytest.param("mount", marks=pytest.mark.runsc)])  # mount: root
def test_a_failing_step_stops_before_runsc_and_says_why_in_runscs_log(tmp_path, bad):
    log = tmp_path / "runsc.log"
    launch = (
        Launch(join_cgroups=(str(tmp_path / "gone" / "cgroup.procs"),))
        if bad == "join"
        else Launch(mounts=(("false",),))
    )
    r = subprocess.run([*launcher_argv(launch, str(log)), "/bin/echo", "ran"], capture_output=True, text=True)
    assert r.returncode == LAUNCHER_FAILED
    assert r.stdout == "" and r.stderr == ""  # nothing in the command's own streams
    why = _runsc_error(log)
    assert why is not None
    assert ("could not join the run's cgroup" in why) if bad == "join" else ("launcher step failed: false" in why)


def test_paths_with_shell_metacharacters_are_quoted(tmp_path):
    odd = tmp_path / "a b;$(touch pwned)"
    odd.mkdir()
    argv = launcher_argv(Launch(join_cgroups=(str(odd / "cgroup.procs"),)), str(tmp_path / "log"))
    r = subprocess.run([*argv, "/bin/true"], capture_output=True, cwd=tmp_path)
    assert r.returncode == 0 and (odd / "cgroup.procs").exists()
    assert not (tmp_path / "pwned").exists()


def test_cgroup_v2_leaf_has_one_procs_file(tmp_path):
    """FAKE v2 tree: a v2 leaf is joined with one write (v1: one per controller)."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    v2 = Cgroup("/gvisor-mcp/gm-1", 2, root=tmp_path)
    assert v2.procs_files() == (str(tmp_path / "gvisor-mcp" / "gm-1" / "cgroup.procs"),)
    v1 = Cgroup("/gvisor-mcp/gm-1", 1, root=Path("/sys/fs/cgroup"))
    assert v1.procs_files() == tuple(
        f"/sys/fs/cgroup/{c}/gvisor-mcp/gm-1/cgroup.procs" for c in ("memory", "cpu", "pids")
    )


def waiting(tmp_path: Path) -> subprocess.Popen:
    """A launcher that waits for its go line, in front of `sh -c` (not runsc)."""
    argv = launcher_argv(Launch(wait_for_go=True), str(tmp_path / "log"))
    return subprocess.Popen(
        [*argv, "/bin/sh", "-c", 'printf "[%s]" "$(cat)"; echo ran'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_waiting_launcher_runs_nothing_until_its_go_line(tmp_path):
    launch = Launch(wait_for_go=True)
    assert not launch.empty and "read -r go" in launcher_argv(launch, "/log")[2]
    # EOF instead of a go line (a spare nobody took): exit 0, runsc never runs.
    p = waiting(tmp_path)
    out, err = p.communicate(b"", timeout=10)
    assert (p.returncode, out, err) == (0, b"", b"")


def test_go_pipe_gives_runsc_the_rest_of_the_pipe_byte_for_byte(tmp_path):
    p = waiting(tmp_path)
    out, _ = p.communicate(GO_PIPE + b"first\nsecond", timeout=10)
    assert (p.returncode, out) == (0, b"[first\nsecond]ran\n")
    assert go_line(True) == GO_PIPE


def test_go_null_gives_runsc_dev_null_whatever_else_the_pipe_holds(tmp_path):
    p = waiting(tmp_path)
    out, _ = p.communicate(GO_NULL + b"not for the command", timeout=10)
    assert (p.returncode, out) == (0, b"[]ran\n")
    assert go_line(False) == GO_NULL


def test_a_waiting_launcher_joins_before_it_waits(tmp_path):
    """The join (the costly part: a cgroup migration) is done before the go
    line is read, so a spare's launcher has joined before a run takes it;
    a failed join ends it with LAUNCHER_FAILED before any go line."""
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    argv = launcher_argv(Launch(join_cgroups=(str(procs),), wait_for_go=True), str(tmp_path / "log"))
    p = subprocess.Popen([*argv, "/bin/echo", "ran"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while procs.read_text() != "0\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procs.read_text() == "0\n" and p.poll() is None  # joined, still waiting
    out, _ = p.communicate(GO_NULL, timeout=10)
    assert (p.returncode, out) == (0, b"ran\n")
    gone = launcher_argv(
        Launch(join_cgroups=(str(tmp_path / "missing" / "cgroup.procs"),), wait_for_go=True), str(tmp_path / "log")
    )
    p = subprocess.run([*gone, "/bin/echo", "ran"], input=b"", capture_output=True, timeout=10)
    assert (p.returncode, p.stdout) == (LAUNCHER_FAILED, b"")
