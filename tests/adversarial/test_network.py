"""network=sandbox through the real server over stdio, against the test internet.

What an agent sees (results, text, refusals), what the operator sees (audit
lines, Prometheus), and that no namespace outlives its run, including when
the server itself is SIGKILLed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import httpx2
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gvisor_mcp.network import referenced_netns
from gvisor_mcp.network.netns import netns_fds
from gvisor_mcp.sandbox.spares import PER_KEY

from ..conftest import leftovers
from .conftest import audit, run, server_pids, structured, text, write_policy


def policy_for(internet, tmp_path, *, default: str = "none", workspace: bool = False):
    body = {
        "version": 1,
        "defaults": {"network": default, "timeout": "90s"},
        "network": {"allowed": ["none", "sandbox"], "egress": internet.policy_egress()},
        "workspace": {"enabled": workspace},
    }
    return write_policy(tmp_path, yaml.safe_dump(body))


def flags(internet, policy, *extra: str) -> tuple[str, ...]:
    return ("--policy", str(policy), *internet.egress_host_args, "--no-system-dns", *extra)


async def no_netns_held(pid: int) -> None:
    """Teardown of an answered run finishes in the background: wait until
    the server holds no run's namespaces, only those of the spares made
    ahead for the next cold network=sandbox runs (spares.PER_KEY of them,
    S and E each; every run here has the same shape)."""
    spares = 2 * PER_KEY
    host = os.stat("/proc/self/ns/net").st_ino  # held for a moment while a namespace is made
    with anyio.move_on_after(30):
        while len(held := netns_fds(pid) - {host}) != spares:
            await anyio.sleep(0.1)
    assert len(held) == spares, f"the server holds {len(held)} network namespaces, its spares' {spares}"


def holders(inodes: set[int]) -> list[str]:
    """Who holds one of `inodes` (as its namespace, or an fd), for a failure's message."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            own = os.stat(f"/proc/{pid}/ns/net").st_ino
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace")
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except OSError:
            continue
        how = (["own"] if own in inodes else []) + (["fd"] if netns_fds(pid) & inodes else [])
        if how:
            out.append(f"{pid} {state} {'+'.join(how)}: {cmd}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_agent_sees_what_was_allowed_and_denied(serve, internet, sandbox_base, tmp_path):
    metrics_port = free_port()
    policy = policy_for(internet, tmp_path)
    state = sandbox_base / "state"
    async with serve(
        *flags(internet, policy, "--pool-size", "0", "--metrics-port", str(metrics_port)), state_dir=state
    ) as c:
        (pid,) = server_pids(sandbox_base)

        r = await run(c, command="curl -sS http://web.test/hello", network="sandbox")
        s = structured(r)
        assert (s["status"], s["exit_code"]) == ("exited", 0), text(r)
        assert s["stdout"] == f"hello from the test internet path=/hello client={internet.gateway}\n"
        assert "network: allowed web.test:80 (1 connection" in text(r)
        assert s["network"]["destinations"][0]["destination"] == "web.test:80"

        r = await run(
            c,
            command="python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target /tmp/s "
            "--index-url http://pypi.test/simple/ --trusted-host pypi.test gvmcp-hello && "
            "PYTHONPATH=/tmp/s python3 -c 'import gvmcp_hello as g; print(g.GREETING)'",
            network="sandbox",
            memory_mb=512,
        )
        assert structured(r)["exit_code"] == 0, text(r)
        assert structured(r)["stdout"].endswith("hello from a test wheel\n")

        # Denied: a name, the test internet's host-side address, metadata, the
        # host's loopback and the MCP server's own port (its metrics listener).
        cmd = (
            "curl -fsS -m 10 http://evil.example/; "
            "curl -fsS -m 10 -p https://evil.example/; "
            f"curl -fsS -m 10 http://{internet.gateway}/; "
            "curl -fsS -m 10 http://169.254.169.254/latest/meta-data/; "
            f"curl -fsS -m 10 --noproxy '' -x $HTTP_PROXY http://127.0.0.1:{metrics_port}/metrics; "
            f"curl -fsS -m 10 --noproxy '*' http://127.0.0.1:{metrics_port}/metrics; echo direct=$?; "
            f"curl -fsS -m 10 --noproxy '*' http://{internet.web}/hello; echo direct=$?; "
            "true"
        )
        r = await run(c, command=cmd, network="sandbox")
        s, t = structured(r), text(r)
        assert "network: denied evil.example:80 (not in the egress allowlist)" in t
        assert "network: denied evil.example:443 (not in the egress allowlist)" in t
        for dest in (f"{internet.gateway}:80", "169.254.169.254:80", f"127.0.0.1:{metrics_port}"):
            assert f"network: denied {dest} (not in the egress allowlist: an IP address" in t, t
        assert s["stdout"] == "direct=7\ndirect=7\n", s  # no route, no proxy: refused at once
        assert s["network"]["denied"] == 5

        # Another run's proxy: its address is not even routable from here.
        bg = structured(await run(c, command="echo $HTTP_PROXY; sleep 120", network="sandbox", background=True))
        with anyio.fail_after(60):
            while not (
                other := structured(await c.call_tool("inspect_result", {"result_id": bg["result_id"]}))["data"].strip()
            ):
                await anyio.sleep(0.1)
        r = await run(c, command=f"curl -sS -m 10 -x {other} http://web.test/hello; echo rc=$?", network="sandbox")
        s = structured(r)
        assert s["stdout"] == "rc=7\n" and "Couldn't connect" in s["stderr"], s
        assert s["network"]["connections"] == 0
        await c.call_tool("cancel_command", {"result_id": bg["result_id"]})

        # A request may narrow the allowlist, never widen it.
        r = await run(c, command="true", network="sandbox", egress=["evil.example"])
        assert r.is_error and "egress" in text(r) and "web.test, pypi.test" in text(r), text(r)
        r = await run(c, command="curl -fsS http://web.test/hello", network="sandbox", egress=["pypi.test"])
        assert "network: denied web.test:80 (not in the egress allowlist)" in text(r)

        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                        break
                    except httpx2.TransportError:
                        await anyio.sleep(0.1)
        await no_netns_held(pid)

    samples = {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for f in text_string_to_metric_families(metrics)
        for m in f.samples
    }
    assert samples[("gvisor_mcp_egress_connections_total", (("tenant", "default"), ("verdict", "denied")))] == 6
    assert samples[("gvisor_mcp_egress_connections_total", (("tenant", "default"), ("verdict", "allowed")))] >= 2
    assert samples[("gvisor_mcp_egress_bytes_total", (("direction", "down"), ("tenant", "default")))] > 0

    lines = [e for e in audit(state) if e.get("event") == "egress"]
    denied = [e for e in lines if e["decision"] == "denied"]
    assert len(denied) == 6 and all(e["tenant"] == "default" and e["result_id"].startswith("res_") for e in lines)
    assert {e["destination"] for e in denied} >= {"evil.example:80", "evil.example:443", "169.254.169.254:80"}


async def test_pooled_sandbox_mode_and_server_sigkill_leave_no_namespace(serve, internet, sandbox_base, tmp_path):
    """The pool boots sandbox-mode sandboxes with their namespaces ready; a
    SIGKILLed server's namespaces die with it and its runsc processes, which
    the next server reaps at start."""
    policy = policy_for(internet, tmp_path, default="sandbox")
    async with serve(*flags(internet, policy, "--pool-size", "1")) as c:
        (pid,) = server_pids(sandbox_base)
        with anyio.fail_after(120):  # until a call is served by a pooled sandbox
            while not (s := structured(r := await run(c, command="curl -sS http://web.test/hello")))["warm"]:
                await anyio.sleep(0.5)
        assert s["exit_code"] == 0 and "hello from the test internet" in s["stdout"], text(r)
        assert s["network"]["destinations"][0]["verdict"] == "allowed"

        bg = structured(await run(c, command="curl -sS http://web.test/hello; sleep 600", background=True))
        with anyio.fail_after(60):
            while (
                "hello" not in structured(await c.call_tool("inspect_result", {"result_id": bg["result_id"]}))["data"]
            ):
                await anyio.sleep(0.1)
        # Minus the host's own namespace: while the pool prepares the next
        # sandbox's namespaces, the server briefly holds an fd to it too
        # (netns.create's way back), and every process on the host holds that
        # one for ever (this wait below timed out ~1 run in 10 on it).
        held = netns_fds(pid) - {os.stat("/proc/self/ns/net").st_ino}
        assert len(held) >= 2
        os.kill(pid, 9)
        with anyio.fail_after(30):
            while os.path.exists(f"/proc/{pid}"):
                await anyio.sleep(0.05)
        # The kill left runsc processes, which still hold the run's sandbox namespace.
        assert leftovers(sandbox_base).get("processes")
    async with serve(*flags(internet, policy, "--pool-size", "0")) as c:
        r = await run(c, command="echo ok")
        assert structured(r)["stdout"] == "ok\n"
        # The new server is left out: it inherited nothing from the dead one,
        # and its spares' fresh namespaces may reuse a freed inode number
        # (this wait timed out ~1 run in 6 on that, once spares held some).
        (new,) = server_pids(sandbox_base)
        with anyio.move_on_after(30):
            while held & referenced_netns(exclude=[new]):
                await anyio.sleep(0.2)
        assert not held & referenced_netns(exclude=[new]), holders(held)
