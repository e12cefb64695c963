"""Isolation: what a command inside a sandbox can reach, see and change.

Network `none` reaches nothing outside the sandbox; the server's environment,
host paths and the host kernel are invisible; read-only mounts stay read-only
on the host even for root inside; setuid gives nothing; two sandboxes running
at the same time share no processes, /tmp or IPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import threading
import uuid
from pathlib import Path

import anyio
import pytest

from ..conftest import seen_by
from .conftest import (
    canary,
    ok,
    output_until,
    run,
    running_container,
    server_pids,
    structured,
    write_policy,
)

pytestmark = pytest.mark.runsc

PROBE = r"""
import json, socket
out = {}
def attempt(host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        return "CONNECTED"
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        s.close()
# Control: the sandbox's own loopback works, so the probe can tell success.
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
out["own loopback"] = attempt("127.0.0.1", srv.getsockname()[1])
for host, port in TARGETS:
    out[f"{host}:{port}"] = attempt(host, port)
try:
    socket.getaddrinfo("example.com", 443)
    out["dns"] = "RESOLVED"
except OSError as e:
    out["dns"] = str(e)
print(json.dumps(out))
"""


class Listener:
    """A TCP listener on the host's loopback that records every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_network_none_reaches_no_public_address_no_host_listener_and_not_the_server(serve):
    listener = Listener()
    metrics_port = free_port()  # the MCP server's own listener (Prometheus, loopback)
    try:
        async with serve("--pool-size", "0", "--metrics-port", str(metrics_port)) as c:
            # Positive control from the host: both listeners answer there.
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5):
                pass
            with anyio.fail_after(30):
                while listener.accepted < 1:
                    await anyio.sleep(0.05)
            seen_by_host = listener.accepted
            targets = [
                ("1.1.1.1", 53),
                ("8.8.8.8", 443),
                ("127.0.0.1", listener.port),
                ("127.0.0.1", metrics_port),
                ("10.0.2.2", 80),
                ("169.254.169.254", 80),
            ]
            probe = PROBE.replace("TARGETS", repr(targets))
            s = await ok(c, f"python3 - <<'EOF'\n{probe}\nEOF")
            got = json.loads(s["stdout"])
            assert got.pop("own loopback") == "CONNECTED"
            assert got.pop("dns") != "RESOLVED"
            for target, outcome in got.items():
                assert "CONNECTED" not in outcome, (target, outcome)
            await anyio.sleep(0.5)  # let the listener's thread see anything in flight
            assert listener.accepted == seen_by_host  # nothing from the sandbox arrived
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=5):
                pass  # the server's listener was up all along
            await canary(c)
    finally:
        listener.close()


async def test_the_servers_environment_is_not_visible_inside_nor_given_to_runsc(serve, sandbox_base):
    secret = f"gm-fake-secret-{uuid.uuid4().hex}"
    async with serve("--pool-size", "0", env={"GVISOR_MCP_FAKE_SECRET": secret, "AWS_SECRET_ACCESS_KEY": secret}) as c:
        [pid] = server_pids(sandbox_base)
        assert secret.encode() in Path(f"/proc/{pid}/environ").read_bytes()  # the server has it...
        s = await ok(c, "env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; cat /proc/self/cmdline")
        out = s["stdout"] + s["stderr"]
        assert "PATH=" in out and secret not in out and "AWS_SECRET" not in out
        # ...and so does no host process of the sandbox (runsc gets a fixed environment).
        rid = structured(await run(c, command="sleep 300", background=True))["result_id"]
        await running_container(c, rid)
        runsc = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, f"--root={sandbox_base}/runsc")]
        assert runsc
        for p in runsc:
            env = _environ(p)
            assert secret.encode() not in env and b"AWS_SECRET" not in env and b"GVISOR_MCP" not in env
        await c.call_tool("cancel_command", {"result_id": rid})
        await canary(c)


def _cmdline_has(pid: str, needle: str) -> bool:
    try:
        return needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


async def test_proc_sys_and_uname_reveal_no_host_path_or_host_kernel(serve, sandbox_base):
    async with serve("--pool-size", "0") as c:
        s = await ok(
            c,
            "hostname; uname -a; cat /proc/version /proc/cmdline /proc/self/mountinfo /proc/mounts "
            "/proc/self/cgroup /proc/self/status /proc/1/cmdline; ls -R /sys 2>/dev/null | head -2000; "
            "cat /etc/hostname /etc/hosts /etc/resolv.conf; pwd; echo $HOME",
        )
        seen = s["stdout"] + s["stderr"]
        host_facts = {
            "host kernel release": platform.release(),
            "host kernel version": platform.version(),
            "server state root": str(sandbox_base),
            "runtime base": "/run/gvisor-mcp",
            "state directory": "/state/workspaces",
            "container id": s["container_id"],
            "cgroup parent": "gvisor-mcp-test",
        }
        for what, fact in host_facts.items():
            assert fact not in seen, f"{what} ({fact!r}) is visible inside"
        assert seen.startswith("sandbox\nLinux sandbox ")  # our hostname, gVisor's own uname
        host = socket.gethostname()
        assert host == "sandbox" or host not in seen.split(), f"host name {host!r} is visible inside"
        await canary(c)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry's kind, mode, mtime and content (a link's target: the
    built-in /etc holds links such as os-release -> ../usr/lib/os-release)."""
    out = {}
    for p in sorted([directory.resolve(), *directory.resolve().rglob("*")]):
        st = p.lstat()
        if p.is_symlink():
            content = "-> " + os.readlink(p)
        else:
            content = None if p.is_dir() else sha(p)
        out[str(p.relative_to(directory.resolve()))] = (p.is_dir(), st.st_mode, st.st_mtime_ns, content)
    return out


ATTACKS = """
cd {d}
printf '' > victim
python3 -c "import os; os.truncate('victim', 1)"
python3 -c "open('victim', 'r+').write('pwned')"
python3 -c "open('victim', 'a').write('pwned')"
chmod 777 victim; chown 1000 victim; touch -d 2001-01-01 victim
rm -f victim; mv victim v2; ln victim v3; ln -s /x v4; mkdir sub2; rmdir sub; mknod fifo p
python3 -c "import os; os.setxattr('victim', 'user.x', b'1')"
echo done
"""


async def test_root_inside_cannot_change_a_read_only_mount_on_the_host(serve, sandbox_base, tmp_path):
    """Root inside (a policy with user 0) tries every way to change a file of a
    read-only bind: the host's /usr (a directory this test owns under
    /usr/local/share) and the generated /etc every run shares. Found a real
    defect: with runsc's directfs, open(O_TRUNC) failed with EROFS inside but
    emptied the host file; the server now runs runsc with --directfs=false."""
    victim_dir = Path("/usr/local/share") / f"gvisor-mcp-adversarial-{uuid.uuid4().hex[:8]}"
    victim_dir.mkdir(parents=True)
    try:
        (victim_dir / "victim").write_text("host content\n")
        (victim_dir / "sub").mkdir()
        before = snapshot(victim_dir)
        policy = write_policy(tmp_path, 'version: 1\ndefaults: {user: "0:0"}\n')
        async with serve("--policy", str(policy), "--pool-size", "0") as c:
            etc = sandbox_base / "bundles" / ".image" / "etc"
            etc_before = snapshot(etc)
            for d in (str(victim_dir), "/etc"):
                s = structured(
                    await run(c, command=ATTACKS.format(d=d).replace("victim", "victim" if d != "/etc" else "passwd"))
                )
                assert s["stdout"] == "done\n", s
                assert "Read-only file system" in s["stderr"], s
            assert snapshot(victim_dir) == before
            assert snapshot(etc) == etc_before
            # Runs after the attack still see the real /etc.
            s = await ok(c, "id -un; grep -c sandbox /etc/passwd")
            assert s["stdout"] == "root\n1\n"
            await canary(c)
        assert snapshot(victim_dir) == before
    finally:
        shutil.rmtree(victim_dir)


async def test_setuid_gives_nothing(serve, sandbox_base, tmp_path):
    """A setuid-root copy of `id` planted in the workspace by the host, and the
    host's own setuid programs under /usr: run by uid 1000, none raises the
    effective uid (nosuid mounts, no_new_privs)."""
    policy = write_policy(tmp_path, "version: 1\nworkspace: {scope: tenant, size: 16MiB}\n")
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        await ok(c, "true")  # the workspace exists now
        [pid] = server_pids(sandbox_base)
        ws = seen_by(pid, sandbox_base / "state" / "workspaces" / "default" / "shared")
        shutil.copy("/usr/bin/id", ws / "suid-id")
        os.chown(ws / "suid-id", 0, 0)
        os.chmod(ws / "suid-id", 0o4755)
        s = await ok(c, "ls -l /workspace/suid-id; /workspace/suid-id -u; /workspace/suid-id -un")
        assert s["stdout"].startswith("-rwsr-xr-x") and s["stdout"].endswith("\n1000\nsandbox\n"), s
        s = structured(
            await run(
                c,
                command="find /usr/bin -perm -4000 | head -3; echo | su -c 'id -u' root; newgrp root </dev/null; id -u",
            )
        )
        assert "/usr/bin/" in s["stdout"] and s["stdout"].endswith("1000\n"), s
        assert "\n0\n" not in "\n" + s["stdout"]
        await canary(c)


async def test_two_sandboxes_at_once_share_no_processes_tmp_or_ipc(serve):
    """A runs with a marker process, a /tmp file, a SysV shared memory segment
    and an abstract unix socket; B, at the same time, sees none of them and
    cannot signal A."""
    tag = uuid.uuid4().hex[:8]
    key = int(tag[:7], 16)
    a_script = f"""
echo {tag} > /tmp/marker-{tag}
exec python3 -c "
import ctypes, socket, time
libc = ctypes.CDLL(None, use_errno=True)
shm = libc.shmget({key}, 4096, 0o1666)
s = socket.socket(socket.AF_UNIX); s.bind('\\0gm-{tag}'); s.listen(1)
print('ready', shm >= 0, libc.shmget({key}, 0, 0) == shm, flush=True)
time.sleep(600)
" sleeper-{tag}
"""
    b_script = f"""
cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo
ls -A /tmp
python3 -c "
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
print('shm', libc.shmget({key}, 0, 0), ctypes.get_errno())
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('\\0gm-{tag}'); print('socket CONNECTED')
except OSError as e:
    print('socket refused', e.errno)
"
kill -9 -1; echo killed-all
"""
    async with serve("--pool-size", "0") as c:
        rid = structured(await run(c, command=a_script, background=True))["result_id"]
        assert "ready True True" in await output_until(c, rid, "ready")  # A sees its own segment
        b = structured(await run(c, command=b_script))
        assert f"sleeper-{tag}" not in b["stdout"] and f"marker-{tag}" not in b["stdout"], b
        lines = b["stdout"].splitlines()
        assert "shm -1 2" in lines, b  # ENOENT: no such segment here
        assert "socket CONNECTED" not in lines and "socket refused 111" in lines, b
        # A is untouched by B's `kill -9 -1`.
        assert structured(await c.call_tool("inspect_result", {"result_id": rid}))["status"] == "running"
        assert structured(await c.call_tool("cancel_command", {"result_id": rid}))["status"] == "killed"
        await canary(c)


async def test_every_call_gets_a_fresh_sandbox_even_from_the_warm_pool(serve, tmp_path):
    """Warm calls claim a pre-booted sandbox: none is ever claimed twice. Each
    call writes to /tmp and to / (root inside, so / is writable) and looks for
    what the call before it wrote; it must find nothing, in another container."""
    policy = write_policy(tmp_path, 'version: 1\ndefaults: {user: "0:0"}\nworkspace: {enabled: false}\n')
    probe = (
        "for f in /tmp/mark /mark; do [ -e $f ] && echo FOUND $f $(cat $f); done; "
        "echo $MY > /tmp/mark && echo $MY > /mark && echo wrote; ls -A /tmp"
    )
    async with serve("--policy", str(policy), "--pool-size", "2") as c:
        results = []
        with anyio.fail_after(300):
            while sum(s["warm"] for s in results) < 4:  # until four calls were served warm
                results.append(await ok(c, probe, env={"MY": f"call{len(results)}"}))
        for s in results:
            assert s["stdout"] == "wrote\nmark\n", s  # nothing of any earlier call
        ids = [s["container_id"] for s in results]
        assert len(set(ids)) == len(ids), ids
        warm = [i for i, s in enumerate(results) if s["warm"]]
        assert any(i - 1 in range(len(results)) for i in warm)  # a warm call right after another call
        await canary(c)
