"""The one place that builds runsc command lines and runs them.

Everything runsc-specific lives here: global flags, the foreground `run`
(DESIGN.md: `runsc wait` loses the exit status after create/start, and
detached sandboxes keep pipes open), kill/delete/list, and reading runsc's
state directory to learn when the sandbox is running the command.

Why over ~400 lines: the project's rule is ONE place that talks to runsc;
the launcher (cgroup join, mount steps), the pipes and the boot watch are
all part of how a runsc command line runs, so they stay with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc
from pydantic import BaseModel, ConfigDict

from .errors import RunscError
from .options import NetworkMode
from .outfile import OutputFile

# Only what runsc itself needs: the server's own environment (secrets, LD_*
# tricks) never reaches the runsc process.
RUNSC_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

LAUNCHER_FAILED = 127
"""The launcher's exit status when a step failed (runsc never started); its
reason is a JSON error line in runsc's own log, where runsc's errors go."""


class Launch(BaseModel):
    """What the `runsc run` client's own process does before it execs runsc.

    A `/bin/sh -c` wrapper (anyio has no preexec_fn), one per run, that
    composes whatever a run needs:

    - `join_cgroups`: cgroup.procs files the process moves itself into, so
      the client and every process it starts (gofer, sandbox) begin life in
      the run's own leaves. runsc then runs with `--ignore-cgroups`: it
      neither creates cgroups in the other v1 hierarchies nor migrates its
      (multi-threaded) client into and back out of ~13 of them, each
      migration batch waiting out an RCU grace period; ~25 ms of wall time
      per boot here (docs/design-notes.md).
    - `mounts`: commands run in a private mount namespace (`unshare -m`)
      that only the client sees: a `MemTotal` file over /proc/meminfo (with
      `--ignore-cgroups` runsc would otherwise tell the sandbox the host's
      memory), a tmpfs over /proc/sys/net for `--network=sandbox`.

    - `wait_for_go`: after its steps, the launcher waits for one line on its
      stdin (GO_NULL or GO_PIPE, see go_line) before it execs runsc, so it
      can be started and joined ahead of the run it serves (a started spare,
      spares.py): the fork/exec and the cgroup migration (one RCU grace
      period, ~10 ms here) are then off the run's clock. EOF instead of a
      line: it exits 0 without running runsc (a spare nobody took).

    Empty: runsc is exec'd directly, as before (the benchmarks' reference).
    """

    model_config = ConfigDict(frozen=True)

    join_cgroups: tuple[str, ...] = ()
    mounts: tuple[tuple[str, ...], ...] = ()
    wait_for_go: bool = False

    @property
    def empty(self) -> bool:
        return not self.join_cgroups and not self.mounts and not self.wait_for_go


GO_NULL = b"null\n"
"""Go line: runsc's stdin becomes /dev/null (a run without stdin)."""
GO_PIPE = b"pipe\n"
"""Go line: runsc's stdin is the rest of the launcher's stdin pipe (dash's
`read` takes one byte at a time from a pipe, never more than the line)."""


def go_line(stdin: bool) -> bytes:
    """What a waiting launcher (Launch.wait_for_go) is sent to exec runsc."""
    return GO_PIPE if stdin else GO_NULL


LAUNCHER_TOOLS = ("unshare", "mount")
"""What a launcher with mounts runs (util-linux, mount: in every Debian)."""


def missing_launcher_tools() -> list[str]:
    """The LAUNCHER_TOOLS not on runsc's PATH."""
    return [t for t in LAUNCHER_TOOLS if shutil.which(t, path=RUNSC_ENV["PATH"]) is None]


PROC_SYS_NET_COVER = ("mount", "-t", "tmpfs", "-o", "size=4k,mode=555", "gvisor-mcp", "/proc/sys/net")
"""network=sandbox: runsc 2024-07-29 refuses networking "in root network
namespace" when /proc/sys/net/core/rmem_default exists, true in every
namespace on newer kernels (gVisor#10704); the check runs in the client, so
the client's private mount namespace covers /proc/sys/net (the sandbox
still gets its own netstack and /proc). ../shared/notes/network-recipe.md."""


def meminfo_mount(path: str) -> tuple[str, ...]:
    """A bind of `path` (see meminfo_text) over the client's /proc/meminfo."""
    return ("mount", "--bind", path, "/proc/meminfo")


def meminfo_text(memory_bytes: int) -> str:
    """All runsc's client reads of /proc/meminfo: `MemTotal`. It becomes the
    sandbox's MemTotal (and half of it the default size of tmpfs mounts that
    have none, /dev/shm), as the cgroup's limit did without --ignore-cgroups."""
    return f"MemTotal: {memory_bytes // 1024} kB\n"


def launcher_argv(launch: Launch, log_path: str) -> list[str]:
    """The argv that runs `launch`'s steps and then execs the rest of the
    command line (runsc's argv follows, as "$0" "$@")."""
    if launch.empty:
        return []
    steps = [
        (f"echo 0 > {shlex.quote(procs)}", f"could not join the run's cgroup ({procs})")
        for procs in launch.join_cgroups
    ] + [(" ".join(shlex.quote(a) for a in argv), f"launcher step failed: {' '.join(argv)}") for argv in launch.mounts]
    lines = [f"fail() {{ printf '%s\\n' \"$1\" >> {shlex.quote(log_path)}; exit {LAUNCHER_FAILED}; }}"]
    for cmd, why in steps:
        error = json.dumps({"level": "error", "msg": why})
        lines.append(f"{{ {cmd}; }} 2>/dev/null || fail {shlex.quote(error)}")
    if launch.wait_for_go:
        lines.append("read -r go || exit 0")
        lines.append(f'[ "$go" = {GO_PIPE.decode().strip()} ] || exec </dev/null')
    lines.append('exec "$0" "$@"')
    script = "\n".join(lines)
    prefix = ["/bin/sh", "-c", script]
    if launch.mounts:
        prefix = ["unshare", "--mount", "--propagation", "private", *prefix]
    return prefix


def version_line(runsc_path: str) -> str:
    """runsc's first `--version` line ("runsc version 0.0~20240729.0"), or why not.

    Synchronous, for a Ray agent's health answer (called from a sync method)."""
    try:
        out = subprocess.run(
            [runsc_path, "--version"], capture_output=True, text=True, env=RUNSC_ENV, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return (out.stdout.splitlines() or ["unavailable: no output"])[0].strip()


class Runsc:
    def __init__(self, path: str, root: str, platform: str = "systrap") -> None:
        resolved = shutil.which(path)
        if resolved is None:
            raise RunscError(
                f"runsc not found at {path!r}: install it from bookworm-backports "
                "(scripts/setup.sh does) or set runsc_path"
            )
        self.path = resolved
        self.root = root
        self.platform = platform

    def _global(self, network: NetworkMode | None = None) -> list[str]:
        flags = [self.path, f"--root={self.root}", f"--platform={self.platform}"]
        if network is not None:
            # "sandbox" (gVisor's netstack) runs in a namespace the network
            # provider prepared; the spec names it.
            flags.append(f"--network={network.value}")
        return flags

    def run_argv(
        self,
        container_id: str,
        bundle: str,
        network: NetworkMode,
        log_path: str,
        launch: Launch = Launch(),
    ) -> list[str]:
        """`runsc run` as the Manager starts it; with an empty `launch`,
        runsc manages the run's cgroup itself (the benchmarks' reference).
        network=sandbox always gets PROC_SYS_NET_COVER in its launcher."""
        if network is NetworkMode.SANDBOX and PROC_SYS_NET_COVER not in launch.mounts:
            launch = launch.model_copy(update={"mounts": (*launch.mounts, PROC_SYS_NET_COVER)})
        return [
            *launcher_argv(launch, log_path),
            *self._global(network),
            # The launcher put the client in the run's cgroups: see Launch.
            *(["--ignore-cgroups"] if launch.join_cgroups else []),
            # Writes to the root go to sandbox memory (charged to its cgroup),
            # never to a file in the image directory; rw binds keep their writes.
            "--overlay2=root:memory",
            # Files go through the gofer, never opened by the sentry itself:
            # with directfs (runsc 2024-07-29) an open(O_TRUNC) of a file on a
            # READ-ONLY bind fails with EROFS but truncates the host file first
            # (root inside, under a policy with user 0, could empty any host
            # file under the read-only /usr, or the generated /etc all runs
            # share). Found by tests/adversarial/test_isolation.py.
            "--directfs=false",
            f"--log={log_path}",
            "--log-format=json",
            "run",
            f"--bundle={bundle}",
            "--",
            container_id,
        ]

    async def open_run(
        self,
        container_id: str,
        bundle: str,
        network: NetworkMode,
        log_path: str,
        stdin: bool,
        launch: Launch = Launch(),
        outputs: tuple[OutputFile | None, OutputFile | None] | None = None,
        cwd: str | None = None,
    ) -> RunProcess:
        """The client, started; its stdout/stderr are our pipes, or, for a
        stream `outputs` gives a file, the sandbox writes that file itself
        (outfile.py; a pooled sandbox has a file stdout and a pipe stderr).
        `cwd`: the bundle's directory while it has another name (a started
        spare's, renamed to `bundle` before the launcher is told to go)."""
        files = outputs or (None, None)
        ends: list[int] = []  # what the client's stdout/stderr get
        ours: list[PipeReader | OutputFile] = []
        try:
            for f in files:
                if f is not None:
                    ends.append(f.writer_fd)
                    ours.append(f)
                else:
                    r, w = _big_pipe()
                    ends.append(w)
                    ours.append(PipeReader(r))
            proc = await anyio.open_process(
                self.run_argv(container_id, bundle, network, log_path, launch),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=ends[0],
                stderr=ends[1],
                cwd=cwd or bundle,
                env=RUNSC_ENV,
                # Our own process group: a Ctrl-C aimed at the server or CLI must
                # not reach runsc behind our back; we kill containers ourselves.
                start_new_session=True,
            )
        except BaseException:
            for stream in ours:
                if isinstance(stream, PipeReader):
                    stream.close_now()
            raise
        finally:
            for f in files:
                if f is not None:
                    f.handed_over()
            for fd, stream in zip(ends, ours, strict=False):
                if isinstance(stream, PipeReader):
                    os.close(fd)
        return RunProcess(proc, ours[0], ours[1])

    async def _call(self, args: Sequence[str], timeout: float = 10.0) -> tuple[int, str, str]:
        """One short runsc command, to its end (or `timeout`), even when the caller is cancelled.

        Shielded because a cancelled anyio.run_process closes asyncio's
        transport, whose Popen.poll() reaps the child ahead of the watcher
        thread, which then reports 255 ("Unknown child process pid"). It
        happened on every timed-out run whose `runsc kill` was still in
        flight when the killed client's exit cancelled the deadline task
        (found in the 10,000-call soak). The caller's cancellation takes
        effect when the command ends, `timeout` at the latest.
        """
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            r = await anyio.run_process([*self._global(), *args], check=False, env=RUNSC_ENV)
            return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        return -1, "", f"runsc {' '.join(args)} timed out after {timeout}s"

    async def kill(self, container_id: str, signal: str = "KILL") -> bool:
        rc, _, _ = await self._call(["kill", "--all", "--", container_id, signal])
        return rc == 0

    async def delete(self, container_id: str) -> tuple[bool, str]:
        rc, _, err = await self._call(["delete", "--force", "--", container_id], timeout=20)
        return rc == 0, err.strip()

    async def list_ids(self) -> list[str]:
        rc, out, err = await self._call(["list", "--format=json"])
        if rc != 0:
            raise RunscError(f"runsc list failed: {err.strip()}")
        data = json.loads(out or "null") or []
        return [c["id"] for c in data]

    async def version(self) -> str:
        r = await anyio.run_process([self.path, "--version"], check=False, env=RUNSC_ENV)
        return r.stdout.decode(errors="replace").splitlines()[0] if r.stdout else ""

    def state_file(self, container_id: str) -> Path:
        return Path(self.root) / f"{container_id}_sandbox:{container_id}.state"

    def has_state(self, container_id: str) -> bool:
        root = Path(self.root)
        try:
            return (
                any(n.startswith(container_id + "_") for n in os.listdir(root))
                or (root / f"runsc-{container_id}.sock").exists()
            )
        except FileNotFoundError:
            return False

    def remove_state_files(self, container_id: str) -> None:
        """Last resort after `delete --force`: the files a killed client left."""
        root = Path(self.root)
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return
        for n in names:
            if n.startswith(container_id + "_") or n == f"runsc-{container_id}.sock":
                try:
                    (root / n).unlink()
                except FileNotFoundError:
                    pass

    def ids_in_state_dir(self) -> set[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            if "_sandbox:" in n:
                out.add(n.split("_sandbox:", 1)[0])
            elif n.startswith("runsc-") and n.endswith(".sock"):
                out.add(n[len("runsc-") : -len(".sock")])
        return out

    def process_pids(self, container_id: str) -> list[int]:
        """Host processes of ours (run client, sandbox, gofer) for a container.

        runsc's sandbox and gofer carry --root= and the container id on their
        command line; orphans whose state is gone are found only this way.
        """
        pids = []
        needle_root = f"--root={self.root}".encode()
        needle_id = container_id.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if needle_root in cmd and needle_id in cmd.split(b"\0"):
                pids.append(int(entry))
        return pids

    def all_run_ids(self, prefix: str) -> set[str]:
        """Container ids (starting with `prefix`) of every runsc process on our root."""
        ids: set[str] = set()
        needle_root = f"--root={self.root}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if needle_root in cmd:
                ids.update(a.decode() for a in cmd.split(b"\0") if a.startswith(prefix.encode()))
        return ids


# --- boot detection -------------------------------------------------------

_IN_CLOSE_WRITE = 0x8
_IN_MOVED_TO = 0x80
PIPE_SIZE = 1 << 20
"""Output pipes are made this large (F_SETPIPE_SZ; Linux's default maximum):
with the default 64 KiB a flooding command and our reader woke each other
~14,000 times per 100 MB."""

_F_SETPIPE_SZ = 1031
BATCH_BELOW = 256 * 1024
BATCH_PAUSE = 0.001


def _big_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size, or the user's pipe quota: keep the default
        pass
    return r, w


class PipeReader(anyio.abc.ByteReceiveStream):
    """The read end of a pipe, read with os.read: up to a whole pipe buffer
    per wake-up, none of asyncio's stream buffering in between."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._last = 0
        os.set_blocking(fd, False)

    async def receive(self, max_bytes: int = PIPE_SIZE) -> bytes:
        if 0 < self._last < BATCH_BELOW:
            # More may be on its way (a flood writes 8 KiB at a time): let it
            # gather for a moment rather than wake up per write. An epoll
            # round trip per 8 KiB cost more than the copying itself.
            await anyio.sleep(BATCH_PAUSE)
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                self._last = 0
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            self._last = len(data)
            return data

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            anyio.notify_closing(fd)
            os.close(fd)

    def close_now(self) -> None:
        """Close an end nobody waited on yet (the client never started)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class RunProcess:
    """The `runsc run` client: anyio's Process, with our own output pipes."""

    def __init__(
        self, proc: anyio.abc.Process, stdout: PipeReader | OutputFile, stderr: PipeReader | OutputFile
    ) -> None:
        self._proc = proc
        self.stdin = proc.stdin
        self.stdout = stdout
        self.stderr = stderr

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def send_signal(self, sig: int) -> None:
        """Signal the client without reaping it.

        Popen.send_signal (under anyio's and asyncio's kill/terminate) first
        polls with waitpid(WNOHANG). When the client has just exited (e.g.
        right after `runsc delete`) and asyncio's watcher thread, woken but
        waiting for a CPU on a loaded host, has not reaped it yet, that poll
        reaps it instead: the watcher then logs "Unknown child process pid
        N, will report returncode 255" and the run's client reads 255, not
        its status (seen twice per 1,000 calls in the soak at load 20). A
        plain kill(2) leaves the reaping to the watcher. The pid cannot be
        another process's while returncode is None, except in the one loop
        turn between the watcher's waitpid and its callback, far shorter
        than a wrap of pid_max.
        """
        if self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, sig)
            except ProcessLookupError:
                pass


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class BootWatch:
    """Learns when runsc marks a container "running" in its state file.

    runsc writes `<id>_sandbox:<id>.state` at create and again at start; the
    second write, status "running", is the moment the command starts. An
    inotify watch on the state directory catches it without polling.
    """

    def __init__(self, runsc: Runsc, container_id: str) -> None:
        self._state = runsc.state_file(container_id)
        self._name = self._state.name.encode()
        self.running_at: float | None = None
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            self._fd = -1
            return
        Path(runsc.root).mkdir(parents=True, exist_ok=True)
        wd = _libc.inotify_add_watch(self._fd, runsc.root.encode(), _IN_CLOSE_WRITE | _IN_MOVED_TO)
        if wd < 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def _is_running(self) -> bool:
        try:
            return '"status":"running"' in self._state.read_text().replace(" ", "")
        except OSError:
            return False

    async def wait(self) -> None:
        """Return once the state says running; sets running_at (monotonic)."""
        if self._fd < 0:
            return
        while True:
            await anyio.wait_readable(self._fd)
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            i = 0
            hit = False
            while i + 16 <= len(buf):
                _, _, _, ln = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16 : i + 16 + ln].rstrip(b"\0")
                i += 16 + ln
                if name == self._name:
                    hit = True
            if hit and self._is_running():
                self.running_at = time.monotonic()
                return

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def detach(self) -> int:
        """Give up the inotify fd without closing it (-1 if none).

        Closing an inotify instance that had a watch makes the kernel wait
        out an SRCU grace period: 13-24 ms measured here, blocking the event
        loop. The Manager closes detached fds in a worker thread instead.
        """
        fd, self._fd = self._fd, -1
        return fd
