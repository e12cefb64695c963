"""Scale-out on a real Ray cluster (head + 2 workers, one HostAgent each), real runsc.

The tests share one cluster and run in file order: the node-loss test and
the restart after it come last.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import anyio
import pytest

from gvisor_mcp.runner import HostLost, RunRefused
from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, Mount, ResourceSpec, UserSpec

pytestmark = [pytest.mark.ray, pytest.mark.runsc]

BIN = os.path.join(os.path.dirname(sys.executable), "gvisor-mcp")
SEQ_40000 = "".join(f"{n}\n" for n in range(1, 40001)).encode()
LOST_BOUND = 60.0
"""Host loss must be reported within this (measured: see docs/scale-out.md);
a correctness bound for a noisy machine, not a speed target."""


def rid() -> str:
    return "res_" + uuid.uuid4().hex


def opts(command: str, *, workspace=None, timeout: float = 60) -> ContainerOptions:
    mounts = ()
    if workspace is not None:
        mounts = (Mount(destination="/workspace", source=str(workspace), type="bind", read_only=False),)
    return ContainerOptions(
        command=("/bin/sh", "-c", command),
        user=UserSpec(uid=1000, gid=1000),
        resources=ResourceSpec(memory_mb=128, timeout=timeout, max_output_bytes=1 << 20),
        extra_mounts=mounts,
    )


def alice_ws(cluster):
    return cluster.base / "fe" / "workspaces" / "alice" / "shared"


async def test_runs_spread_over_hosts_and_output_pages_from_where_it_ran(cluster):
    async with cluster.runner() as runner:
        assert {a["host"]: a["usable"] for a in runner.describe()} == {"a": True, "b": True}
        ids = [rid() for _ in range(4)]
        results = {}

        async def one(i: str) -> None:
            results[i] = await runner.run(opts("sleep 1; echo hi"), run_id=i, tenant="bob")

        async with anyio.create_task_group() as tg:
            for i in ids:
                tg.start_soon(one, i)
        assert {r.status for r in results.values()} == {ContainerStatus.EXITED}
        assert {runner.host_of(i)[0] for i in ids} == {"a", "b"}
        # The answer carries counts, not bytes: output stayed on the host.
        assert all(r.stdout == b"" and r.stdout_bytes == 3 for r in results.values())
        # ...and a small output whole beside it: showing it needs no page from the host.
        assert all(runner._inline[i] == {"stdout": b"hi\n", "stderr": b""} for i in ids)
        assert runner.read_remote(ids[0], "stdout", 1, 10) == (b"i\n", 3)

        big = rid()
        r = await runner.run(opts("seq 1 60000"), run_id=big, tenant="bob")
        want = "".join(f"{n}\n" for n in range(1, 60001)).encode()
        assert r.stdout_bytes == len(want)
        got, offset = b"", 0
        while True:
            page = runner.read_remote(big, "stdout", offset, 100_000)
            assert page is not None
            data, total = page
            got += data
            offset += len(data)
            if not data or offset >= total:
                break
        assert got == want
        assert big not in runner._inline  # above INLINE_MAX: paged from its host only
        assert runner.read_remote(rid(), "stdout", 0, 10) is None  # not a remote result


async def test_workspace_lives_on_one_host(cluster):
    async with cluster.runner() as runner:
        ws = alice_ws(cluster)
        first = rid()
        await runner.run(opts("echo one > /workspace/f", workspace=ws), run_id=first, tenant="alice")
        home = runner.host_of(first)[0]
        ids = [rid() for _ in range(3)]
        for i in ids:
            r = await runner.run(opts("cat /workspace/f", workspace=ws), run_id=i, tenant="alice")
            assert r.status is ContainerStatus.EXITED and r.exit_code == 0
            assert runner.read_remote(i, "stdout", 0, 100)[0] == b"one\n"
        assert {runner.host_of(i)[0] for i in ids} == {home}
        assert not (ws / "f").exists()  # nothing of it on the front end's host


async def test_cancel_reaches_the_host_running_it(cluster):
    async with cluster.runner() as runner:
        i = rid()
        box: dict = {}

        async def go() -> None:
            box["r"] = await runner.run(opts("echo started; sleep 60"), run_id=i, tenant="bob")

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            with anyio.fail_after(60):
                while not (runner.active_run(i) and runner.active_run(i).host):
                    await anyio.sleep(0.1)
                while runner.read_remote(i, "stdout", 0, 100)[0] != b"started\n":
                    await anyio.sleep(0.1)
            t = time.monotonic()
            assert await runner.kill(i)
        assert box["r"].status is ContainerStatus.KILLED
        assert time.monotonic() - t < 30


async def test_leases_are_freed_off_the_answer_path(cluster):
    """The release of a run's lease goes after the answer: the next run of a
    tenant at its quota (carol: one at a time) is never refused for it, and
    the coordinator's lease count returns to 0."""
    async with cluster.runner() as runner:
        for _ in range(4):
            r = await runner.run(opts("true"), run_id=rid(), tenant="carol")
            assert r.status is ContainerStatus.EXITED and r.exit_code == 0
        with anyio.fail_after(30):  # a correctness bound: the release is one round trip
            while sum((await runner.coordinator.snapshot.remote())["used"].values()) or runner._releasing:
                await anyio.sleep(0.1)


def test_forged_spec_is_refused_by_the_agent(cluster):
    import ray

    from gvisor_mcp.cluster.spec import RunSpec, SpecRefused

    agent = cluster.agents["a"]
    good = RunSpec(result_id=rid(), tenant="bob", command=("/bin/true",)).model_dump()
    forged = [
        ({**good, "rootfs": "/"}, "Extra inputs"),
        ({**good, "extra_mounts": [{"destination": "/h", "source": "/"}]}, "Extra inputs"),
        ({**good, "network": "host"}, "network='host'"),
        ({**good, "resources": {"memory_mb": 1 << 20}}, "memory_mb=1048576 MiB is above"),
        ({**good, "resources": {"timeout": 7 * 24 * 3600}}, "timeout=604800 s is above"),
        ({**good, "tenant": "../../etc"}, "tenant="),
        ({**good, "image": "/"}, "not in this host's catalog"),
        (
            {
                **good,
                "workspace": {
                    "tenant": "bob",
                    "scope": "session",
                    "session": "../x",
                    "mount": "/workspace",
                    "size_mb": 1,
                },
            },
            "scope='session'",
        ),
        (
            {**good, "workspace": {"tenant": "bob", "scope": "tenant", "mount": "/workspace", "size_mb": 1 << 30}},
            "workspace.size_mb",
        ),
    ]
    before = ray.get(agent.health.remote())["runs"]
    for spec, why in forged:
        with pytest.raises(SpecRefused) as e:
            ray.get(agent.run.remote(spec), timeout=60)
        assert why in str(e.value), (spec, str(e.value))
    assert ray.get(agent.health.remote())["runs"] == before
    assert cluster.leftovers("a") == {}
    # The same id twice: refused the second time (at most once on a host too).
    ray.get(agent.run.remote(good), timeout=60)
    with pytest.raises(SpecRefused, match="already run on this host"):
        ray.get(agent.run.remote(good), timeout=60)


def test_sandboxes_never_reach_the_cluster(cluster):
    """network none reaches nothing; network sandbox goes through b's egress
    proxy, whose fence refuses the nodes and Ray's ports even though b's own
    ceiling and the run's rules name the head's GCS (127.0.0.0/8:GCS)."""
    import ray

    from gvisor_mcp.cluster.spec import RunSpec
    from gvisor_mcp.network.egress import EgressRules

    agent = cluster.agents["b"]
    fence = ray.get(agent.health.remote())["fence"]
    assert "127.0.0.1/32" in fence["networks"] and cluster.gcs_port in fence["ports"], fence
    gcs = cluster.gcs_port
    probe = (
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {gcs}), timeout=5)\" "
        "&& echo CONNECTED || echo REFUSED"
    )
    none = RunSpec(result_id=rid(), tenant="bob", command=("/bin/sh", "-c", probe))
    proxied = RunSpec(
        result_id=rid(),
        tenant="bob",
        network="sandbox",
        egress=EgressRules(allow=[{"cidr": "127.0.0.0/8", "ports": [gcs, 80]}]),
        # --noproxy '': 127.0.0.1 is in the sandbox's NO_PROXY; force the proxy to be asked.
        command=(
            "/bin/sh",
            "-c",
            f"curl -sS -m 20 -x \"$HTTP_PROXY\" --noproxy '' -o - -w ' %{{http_code}}' "
            f"http://127.0.0.1:{gcs}/; curl -sS -m 20 -x \"$HTTP_PROXY\" --noproxy '' -p -o /dev/null "
            f"-w ' %{{http_connect}}' http://127.0.0.1:{gcs}/; curl -sS -m 20 -x \"$HTTP_PROXY\" "
            "--noproxy '' -o - -w ' %{http_code}' http://127.0.0.1:80/; true",
        ),
    )
    for spec in (none, proxied):
        r = ray.get(agent.run.remote(spec.model_dump()), timeout=120)
        assert r["status"] == "exited", r
    out = ray.get(agent.read.remote(none.result_id, "bob", "stdout", 0, 4096))["data"].decode()
    assert out.strip() == "REFUSED", out
    out = ray.get(agent.read.remote(proxied.result_id, "bob", "stdout", 0, 8192))["data"].decode()
    assert f"port {gcs} is one of the Ray cluster's ports, never reachable from a sandbox" in out, out
    assert "127.0.0.1 is a node of the Ray cluster, never reachable from a sandbox" in out, out  # port 80
    assert out.count(" 403") == 3, out  # plain HTTP and CONNECT to the GCS, HTTP to the node: all refused
    assert cluster.leftovers("b") == {}


def test_a_client_without_the_token_is_refused(cluster):
    code = (
        "import sys, ray\n"
        "try:\n    ray.init(address=sys.argv[1]); print('CONNECTED')\n"
        "except Exception as e:\n    print('REFUSED', type(e).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    wrong = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    r = subprocess.run(
        [sys.executable, "-c", code, cluster.lc.address], env=wrong, capture_output=True, text=True, timeout=180
    )
    assert "REFUSED" in r.stdout and "CONNECTED" not in r.stdout, r.stdout + r.stderr[-2000:]
    assert "Unauthenticated" in r.stderr or "InvalidAuthToken" in r.stderr


async def test_agents_with_another_runsc_or_a_failing_canary_get_no_runs(cluster):
    from gvisor_mcp.sandbox import RunscError  # noqa: F401

    shims = cluster.base / "shims"
    shims.mkdir(exist_ok=True)
    real = subprocess.run(["sh", "-c", "command -v runsc"], capture_output=True, text=True).stdout.strip()
    # Real runsc underneath; only what the agent checks differs.
    other = shims / "runsc-other-version"
    other.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "runsc version 0.0~20990101.0"; exit 0; }}\nexec {real} "$@"\n'
    )
    broken = shims / "runsc-broken-run"
    broken.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = run ] && {{ echo "no sandbox here" >&2; exit 1; }}; done\nexec {real} "$@"\n'
    )
    for p in (other, broken):
        p.chmod(0o755)
    cluster.lc.add_host("c", "d")
    try:
        rc = cluster.start_agent("c", runsc_path=str(other))
        rd = cluster.start_agent("d", runsc_path=str(broken))
        assert rc["canary_ok"] and "20990101" in rc["runsc_version"]
        assert not rd["canary_ok"]
        async with cluster.runner() as runner:
            why = {a["host"]: a["why"] for a in runner.describe()}
            assert "runsc differs" in why["c"] and "canary failed" in why["d"], why
            ids = [rid() for _ in range(4)]  # bob's max_concurrent
            async with anyio.create_task_group() as tg:
                for i in ids:
                    tg.start_soon(lambda i=i: runner.run(opts("true"), run_id=i, tenant="bob"))
            assert {runner.host_of(i)[0] for i in ids} <= {"a", "b"}
    finally:
        cluster.stop_agent("c")
        cluster.stop_agent("d")
        cluster.lc.remove_host("c", graceful=True)
        assert cluster.leftovers("c") == {} and cluster.leftovers("d") == {}


async def test_the_server_runtime_runs_jobs_on_agents(cluster):
    """The front end's Jobs layer through the seam: policy-resolved options
    run on an agent; the result row is here, the output is read from there."""
    from gvisor_mcp.cluster.agent import runsc_version
    from gvisor_mcp.cluster.serve import preflight
    from gvisor_mcp.config import ServeConfig
    from gvisor_mcp.policy import ExecRequest, resolve
    from gvisor_mcp.runtime import start_runtime

    settings = ServeConfig(
        tenant="bob",
        state_dir=cluster.base / "fe2",
        pool_size=0,
        backend="ray",
        ray_address=cluster.lc.address,
        expect_runsc_version=runsc_version("runsc"),
    )
    assert preflight(settings)[0]
    async with start_runtime(settings, cluster.policy) as rt:
        assert rt.jobs.runner is rt.manager and rt.jobs.runner.capacity() > 0  # the agents' capacity
        resolved = resolve(
            cluster.policy.current,
            ExecRequest(command="seq 1 3000; echo err >&2"),
            "bob",
            workspace_root=settings.state_dir / "workspaces",
            session_id="s1",
        )
        job = rt.jobs.start(
            tenant="bob", session="s1", command="seq", options=resolved.options, limits={}, policy_hash=None
        )
        with anyio.fail_after(120):
            await job.done.wait()
        stored = rt.store.get(job.result_id, "bob")
        assert stored.status == "exited" and stored.exit_code == 0, stored
        assert rt.manager.host_of(job.result_id)[0] in ("a", "b")
        data, total = rt.store.read(stored, "stdout", 0, 1 << 20)
        assert data == "".join(f"{n}\n" for n in range(1, 3001)).encode() and total == len(data)
        assert rt.store.read(stored, "stderr", 0, 100)[0] == b"err\n"
        assert not (settings.state_dir / "workspaces").exists()  # nothing prepared on the front end


@contextlib.contextmanager
def ray_front_ends(cluster, n: int):
    """`n` processes of `gvisor-mcp serve --transport http --backend ray` on the
    cluster, sharing one policy and tokens file; on exit: SIGTERM, exit 0."""
    base = cluster.base / f"http-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    policy = cluster.base / "policy.yaml"
    tokens = {
        t: subprocess.run(
            [str(BIN), "token", "add", t, "--policy", str(policy), "--tokens", str(base / "tokens.yaml")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for t in ("alice", "bob", "carol", "dave")
    }
    env = {"PATH": os.environ["PATH"], "GVISOR_MCP_LOG_LEVEL": "INFO", **cluster.lc.env()}
    servers = []
    try:
        for i in range(n):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            err = base / f"fe{i}.err"
            proc = subprocess.Popen(
                [
                    str(BIN),
                    "serve",
                    "--transport",
                    "http",
                    "--port",
                    str(port),
                    "--policy",
                    str(policy),
                    "--tokens",
                    str(base / "tokens.yaml"),
                    "--state-dir",
                    str(base / f"fe{i}"),
                    "--state-root",
                    str(base / f"fe{i}-sandboxes"),
                    "--pool-size",
                    "0",
                    "--backend",
                    "ray",
                    "--ray-address",
                    cluster.lc.address,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err.open("wb"),
                env=env,
            )
            servers.append((proc, port, err))
        for proc, port, err in servers:
            deadline = time.monotonic() + 180
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert proc.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.2)

        def client(i: int, tenant: str, **kw: Any):
            import httpx2
            from mcp import Client
            from mcp.client.streamable_http import streamable_http_client

            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {tokens[tenant]}"}, timeout=120)
            return Client(streamable_http_client(f"http://127.0.0.1:{servers[i][1]}/mcp", http_client=http), **kw)

        yield client, servers
    finally:
        for proc, _, _ in servers:
            proc.send_signal(signal.SIGTERM)
        for proc, _, err in servers:
            assert proc.wait(timeout=90) == 0, err.read_text()[-3000:]
            assert not any(t in err.read_text() for t in tokens.values())  # never in a log line
        assert not (base / "fe0-sandboxes").exists() or not any((base / "fe0-sandboxes").rglob("config.json"))


async def test_serve_http_on_ray_with_a_real_mcp_client(cluster):
    """Two front ends (`serve --transport http --backend ray`), real MCP
    clients: a run's output is paged from the agent that kept it; list_active
    and cancel reach the host running it; a tenant's quota holds across both
    front ends; each front end knows only its own result ids."""
    with ray_front_ends(cluster, 2) as (client, servers):
        async with client(0, "bob") as b0, client(0, "carol") as c0, client(1, "carol") as c1:
            r = (await b0.call_tool("execute_command", {"command": "seq 1 40000"})).structured_content
            assert r["status"] == "exited" and r["exit_code"] == 0, r
            assert r["stdout_truncated"] and r["stdout_bytes"] == len(SEQ_40000)
            got, offset = b"", 0
            while offset is not None:  # pages come from the agent's host, through Ray
                page = (
                    await b0.call_tool(
                        "inspect_result",
                        {"result_id": r["result_id"], "offset": offset, "length": 65536, "encoding": "base64"},
                    )
                ).structured_content
                got += base64.b64decode(page["data"])
                offset = page["next_offset"]
            assert got == SEQ_40000
            here = list(cluster.base.glob(f"http-*/fe0/**/{r['result_id']}*"))
            assert here and all(p.stat().st_size == 0 for p in here), here  # the bytes stayed on the agent

            bg = (
                await b0.call_tool("execute_command", {"command": "echo started; sleep 60", "background": True})
            ).structured_content
            with anyio.fail_after(60):
                while True:
                    active = (await b0.call_tool("list_active", {})).structured_content["commands"]
                    page = (await b0.call_tool("inspect_result", {"result_id": bg["result_id"]})).structured_content
                    if [a["result_id"] for a in active] == [bg["result_id"]] and page["data"] == "started\n":
                        break
                    await anyio.sleep(0.3)
            cancelled = (await b0.call_tool("cancel_command", {"result_id": bg["result_id"]})).structured_content
            assert cancelled["status"] == "killed", cancelled
            assert (await b0.call_tool("list_active", {})).structured_content["commands"] == []

            # carol may run one command at a time, whichever front end she calls.
            hold = (
                await c0.call_tool("execute_command", {"command": "echo held; sleep 60", "background": True})
            ).structured_content
            with anyio.fail_after(60):  # running on an agent, so its lease is held (listed is not enough)
                while (await c0.call_tool("inspect_result", {"result_id": hold["result_id"]})).structured_content[
                    "data"
                ] != "held\n":
                    await anyio.sleep(0.3)
            over = await c1.call_tool("execute_command", {"command": "echo second"})
            text = str(over.structured_content or over.content)
            assert "max_concurrent=1, counted across the cluster" in text, text
            # Result ids are per front end: fe1 does not know fe0's.
            other = await c1.call_tool("inspect_result", {"result_id": hold["result_id"]})
            assert other.is_error
            await c0.call_tool("cancel_command", {"result_id": hold["result_id"]})
            after = (await c1.call_tool("execute_command", {"command": "echo second"})).structured_content
            assert after["status"] == "exited" and after["stdout"] == "second\n", after


def session_ws(cluster, tenant: str, session: str):
    return cluster.base / "fe" / "workspaces" / tenant / "sessions" / session


def held_images(cluster, host: str) -> list:
    """Workspace images on `host` (its agent's workspace root)."""
    return sorted((cluster.host_base(host) / "state" / "workspaces" / ".images").rglob("*.img"))


async def test_file_tools_go_to_the_agent_holding_the_workspace(cluster):
    """write/read/list/delete through the front end's RemoteWorkspaces: the same
    files.py operations, on the host that holds the workspace (placed by the
    first file operation, then the runs that mount it go there)."""

    from gvisor_mcp import files
    from gvisor_mcp.cluster.remote_files import RemoteWorkspaces
    from gvisor_mcp.cluster.spec import SpecRefused
    from gvisor_mcp.fileop import FileOp

    async with cluster.runner() as runner:
        remote = RemoteWorkspaces(runner)
        ws = session_ws(cluster, "alice", "files1")
        owner = (1000, 1000)

        async def op(o, create=True):
            return await remote.file_op("alice", ws, 64, owner, o, create=create)

        assert await op(FileOp(kind="list", limit=10), create=False) is None  # nothing placed by a look
        assert await runner.coordinator.home_of.remote("alice/files1") is None
        done = await op(FileOp(kind="write", path="dir/in.txt", data=b"from write_file\n", uid=1000, gid=1000))
        assert done.created and done.size == 16
        home = await runner.coordinator.home_of.remote("alice/files1")
        assert home in ("a", "b")
        assert not ws.exists()  # nothing on the front end's host
        # A run that mounts it goes to its home and sees the file (owned by the sandbox user).
        r1 = rid()
        r = await runner.run(
            opts(
                "cat /workspace/dir/in.txt; stat -c %u /workspace/dir/in.txt; echo made > /workspace/out.txt",
                workspace=ws,
            ),
            run_id=r1,
            tenant="alice",
        )
        assert r.status is ContainerStatus.EXITED and r.exit_code == 0, r
        assert runner.host_of(r1)[0] == home
        assert runner.read_remote(r1, "stdout", 0, 100)[0] == b"from write_file\n1000\n"
        got = await op(FileOp(kind="read", path="out.txt", length=100))
        assert got.data == b"made\n" and got.size == 5
        entries, truncated = await op(FileOp(kind="list", depth=2, limit=100))
        assert [("/".join(e.path), e.kind) for e in entries] == [
            ("dir", "directory"),
            ("dir/in.txt", "file"),
            ("out.txt", "file"),
        ] and not truncated
        assert await op(FileOp(kind="delete", path="dir", recursive=True)) == "directory"
        with pytest.raises(files.FileError) as e:
            await op(FileOp(kind="read", path="dir/in.txt", length=10))
        assert e.value.kind == "not_found"
        # A symlink a command planted is never followed; a traversal never leaves the workspace.
        await runner.run(opts("ln -s /etc/passwd /workspace/link", workspace=ws), run_id=rid(), tenant="alice")
        with pytest.raises(files.FileError) as e:
            await op(FileOp(kind="read", path="link", length=100))
        assert e.value.kind == "symlink"
        with pytest.raises(SpecRefused, match="file request refused: path: .*'..'"):
            await op(FileOp(kind="read", path="../../../etc/passwd", length=100))
        # The session ends: its workspace goes from its host, and its home from the coordinator.
        before = held_images(cluster, home)
        assert any("files1" in str(p) for p in before), before
        remote.remove("alice", ws)
        remote.flush()
        assert not any("files1" in str(p) for p in held_images(cluster, home))
        assert await runner.coordinator.home_of.remote("alice/files1") is None


def test_forged_file_requests_are_refused_by_the_agent(cluster):
    import ray

    from gvisor_mcp.cluster.spec import SpecRefused

    agent = cluster.agents["b"]
    ws = {"tenant": "bob", "scope": "session", "session": "forge1", "mount": "/workspace", "size_mb": 16}
    good = {"tenant": "bob", "workspace": ws, "owner": {"uid": 1000, "gid": 1000}}
    secret = cluster.base / "secret"
    secret.write_text("not for agents")
    forged = [
        ({**good, "op": {"kind": "read", "path": "../../../../secret", "length": 10}}, "path: "),
        ({**good, "op": {"kind": "read", "path": str(secret), "length": 10}}, "is absolute here"),
        ({**good, "workspace": {**ws, "session": "../.."}, "op": {"kind": "list", "limit": 5}}, "scope='session'"),
        ({**good, "tenant": "..", "workspace": {**ws, "tenant": ".."}}, "tenant='..'"),
        ({**good, "workspace": {**ws, "tenant": "alice"}}, "is not the file request's tenant"),
        ({**good, "workspace": {**ws, "size_mb": 1 << 30}}, "workspace.size_mb"),
        ({**good, "op": {"kind": "read", "path": "f", "length": 1 << 30}}, "above this host's ceiling"),
        ({**good, "op": {"kind": "list", "limit": 10**9}}, "above this host's ceiling"),
        ({**good, "op": {"kind": "write", "path": "f", "data": b"x", "uid": -1}}, "op.uid"),
        ({**good, "root": "/"}, "Extra inputs"),
    ]
    for request, why in forged:
        with pytest.raises(SpecRefused) as e:
            ray.get(agent.files.remote(request), timeout=60)
        assert why in str(e.value), (request, str(e.value))
    assert not any("forge1" in str(p) for p in held_images(cluster, "b"))  # nothing made
    # release_workspace checks its reference too: never a path to remove.
    victim = cluster.base / "victim"
    victim.mkdir()
    for ref in ({**ws, "session": "../../../../victim"}, {**ws, "tenant": "../../.."}):
        with pytest.raises(SpecRefused):
            ray.get(agent.release_workspace.remote(ref), timeout=60)
    assert victim.is_dir() and secret.read_text() == "not for agents"


def test_a_run_holds_its_store_image_against_prune(cluster):
    """Agent a's catalog has an unnamed store image (by digest): while a run
    uses it, `gvisor-mcp image prune` / `image rm` on that host keep it."""
    import ray

    from gvisor_mcp.cluster.spec import RunSpec

    agent = cluster.agents["a"]
    state = cluster.host_base("a") / "state"
    digest = cluster.mini_digest
    spec = RunSpec(result_id=rid(), tenant="bob", image="mini", image_digest=digest, command=("/bin/sleep", "600"))
    ref = agent.run.remote(spec.model_dump())
    deadline = time.monotonic() + 60
    while not any(r["run_id"] == spec.result_id for r in ray.get(agent.active.remote(), timeout=60)):
        assert time.monotonic() < deadline
        ready, _ = ray.wait([ref], timeout=0.2)
        assert not ready, ray.get(ref)  # ended before it was seen running
    cli = [BIN]
    rm = subprocess.run([*cli, "image", "rm", digest, "--state-dir", str(state)], capture_output=True, text=True)
    assert rm.returncode != 0 and f"run {spec.result_id}" in rm.stderr and "host a" in rm.stderr, rm.stderr
    pruned = subprocess.run([*cli, "image", "prune", "--state-dir", str(state)], capture_output=True, text=True)
    assert pruned.returncode == 0, pruned.stderr
    assert (state / "images" / "sha256" / digest.removeprefix("sha256:") / "image.json").exists()
    assert any(r["run_id"] == spec.result_id for r in ray.get(agent.active.remote(), timeout=60))  # still running
    assert ray.get(agent.kill.remote(spec.result_id), timeout=60)
    r = ray.get(ref, timeout=120)
    assert r["status"] == "killed", r
    # The run is over: nothing holds it now, and prune takes it.
    pruned = subprocess.run([*cli, "image", "prune", "--state-dir", str(state)], capture_output=True, text=True)
    assert pruned.returncode == 0 and digest.removeprefix("sha256:")[:12] in pruned.stdout + pruned.stderr, (
        pruned.stdout + pruned.stderr
    )
    assert not (state / "images" / "sha256" / digest.removeprefix("sha256:")).exists()


async def test_file_tools_and_resources_over_mcp_on_ray(cluster):
    """A real MCP client on `serve --backend ray`: write_file then execute_command
    sees the file (same host), read_file of what a command wrote, list_files,
    delete_file, resources; `..` refused; a session's workspace leaves its
    agent when the session ends."""
    with ray_front_ends(cluster, 1) as (client, servers):
        async with client(0, "alice") as al:
            w = await al.call_tool("write_file", {"path": "notes/hello.txt", "content": "hi from write_file\n"})
            assert not w.is_error, w
            r = (
                await al.call_tool(
                    "execute_command", {"command": "cat /workspace/notes/hello.txt; echo out > /workspace/made.txt"}
                )
            ).structured_content
            assert r["status"] == "exited" and r["stdout"] == "hi from write_file\n", r
            got = (await al.call_tool("read_file", {"path": "/workspace/made.txt"})).structured_content
            assert got["data"] == "out\n" and got["total_bytes"] == 4, got
            listed = (await al.call_tool("list_files", {"path": ".", "depth": 2})).structured_content
            paths = {e["path"] for e in listed["entries"]}
            assert {"/workspace/notes", "/workspace/notes/hello.txt", "/workspace/made.txt"} <= paths, paths
            resources = await al.list_resources()
            assert "workspace:///made.txt" in {str(x.uri) for x in resources.resources}
            content = await al.read_resource("workspace:///notes/hello.txt")
            assert content.contents[0].text == "hi from write_file\n"
            d = (await al.call_tool("delete_file", {"path": "made.txt"})).structured_content
            assert d["removed"] == "file", d
            gone = await al.call_tool("read_file", {"path": "made.txt"})
            assert gone.is_error and "does not exist" in str(gone.content), gone
            bad = await al.call_tool("read_file", {"path": "../../../../etc/passwd"})
            assert bad.is_error and "'..'" in str(bad.content), bad
        before = {h: held_images(cluster, h) for h in ("a", "b")}
        async with client(0, "dave", mode="legacy") as dv:  # classic sessions: one workspace each
            w = await dv.call_tool("write_file", {"path": "s.txt", "content": "session file"})
            assert not w.is_error, w
            during = {h: held_images(cluster, h) for h in ("a", "b")}
            made = [p for h in ("a", "b") for p in during[h] if p not in before[h] and "dave" in str(p)]
            assert len(made) == 1, during
        # The client closed its session (HTTP DELETE): the agent removes the workspace.
        with anyio.fail_after(60):
            while made[0].exists():
                await anyio.sleep(0.3)


async def test_host_lost_mid_run_then_its_agent_restarts_and_reaps(cluster):
    import ray

    ws = alice_ws(cluster)
    async with cluster.runner() as runner:
        # The workspace is homed on one host: run there, then lose it.
        probe = rid()
        await runner.run(opts("true", workspace=ws), run_id=probe, tenant="alice")
        home = runner.host_of(probe)[0]
        other = "b" if home == "a" else "a"
        runs_before = {h: ray.get(cluster.agents[h].health.remote())["runs"] for h in ("a", "b")}
        i = rid()
        box: dict = {}

        async def go() -> None:
            try:
                await runner.run(
                    opts("echo start >> /workspace/log; echo started; sleep 90", workspace=ws), run_id=i, tenant="alice"
                )
                box["r"] = "returned"
            except HostLost as e:
                box["lost"], box["at"] = e, time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            with anyio.fail_after(60):
                while not (runner.active_run(i) and runner.active_run(i).host):
                    await anyio.sleep(0.1)
                # Running on its host (a placement row alone is not enough: at load 50
                # the agent had not stored the run 2 s after it was placed).
                while runner.read_remote(i, "stdout", 0, 10)[0] != b"started\n":
                    await anyio.sleep(0.1)
            t0 = time.monotonic()
            await anyio.to_thread.run_sync(cluster.lc.remove_host, home)
            with anyio.fail_after(LOST_BOUND + 30):
                while "lost" not in box and "r" not in box:
                    await anyio.sleep(0.1)
        assert "lost" in box, box
        took = box["at"] - t0
        print(f"host_lost reported {took:.1f} s after the node was killed")
        assert took < LOST_BOUND
        text = str(box["lost"])
        assert "host_lost" in text and "outcome: unknown" in text and "not run again" in text
        # The other host keeps serving, and never saw the lost run.
        n = rid()
        r = await runner.run(opts("echo still here"), run_id=n, tenant="bob")
        assert r.status is ContainerStatus.EXITED and runner.host_of(n)[0] == other
        assert ray.get(cluster.agents[other].health.remote())["runs"] == runs_before[other] + 1
        assert ray.get(cluster.agents[other].read.remote(i, "alice", "stdout", 0, 10)) is None
        # The workspace's runs wait for their host: refused, never moved.
        with pytest.raises(RunRefused, match="lives on host"):
            await runner.run(opts("true", workspace=ws), run_id=rid(), tenant="alice")

    # The host comes back: its new agent reaps what the crash left.
    cluster.agents.pop(home, None)
    cluster.lc.add_host(home)  # Ray installs signal handlers: main thread only
    report = await anyio.to_thread.run_sync(cluster.start_agent, home)
    assert report["canary_ok"]
    assert report["lost_results"] == 1, report
    assert report["reaped_containers"] >= 1 or report["reaped_cgroups"] >= 1, report
    assert cluster.leftovers(home) == {}
    async with cluster.runner() as runner:
        with anyio.fail_after(30):
            while not runner.usable_hosts().get(home):
                await runner.refresh()
                await anyio.sleep(0.5)
        c = rid()
        r = await runner.run(opts("cat /workspace/log", workspace=ws), run_id=c, tenant="alice")
        assert runner.host_of(c)[0] == home
        assert runner.read_remote(c, "stdout", 0, 100)[0] == b"start\n"  # ran once, never again
