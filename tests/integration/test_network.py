"""network=sandbox on real runsc, against the test internet (tests/internet.py).

Each run gets its own namespaces and proxy; these tests check what a command
inside can and cannot reach, what the result says about it, and that the
namespaces, veths and listeners are gone afterwards, however the run ended.
"""

from __future__ import annotations

import contextlib

import anyio
import pytest

from gvisor_mcp.network import EgressRules, NetworkConfig, NetworkService, referenced_netns
from gvisor_mcp.network import service as service_mod
from gvisor_mcp.network.netns import NetnsError
from gvisor_mcp.sandbox import (
    ContainerOptions,
    ContainerStatus,
    Mount,
    NetworkMode,
    ResourceSpec,
    SandboxError,
)
from gvisor_mcp.sandbox import spares as spares_mod
from gvisor_mcp.sandbox.container import mountpoints_of, spare_shape

from ..conftest import leftovers
from .conftest import WarmManager, make_config


class Watched(NetworkService):
    """The real service, remembering every namespace it made (inodes)."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__(config)
        self.inodes: list[int] = []

    async def open(self, container_id: str):
        run = await super().open(container_id)
        self.inodes += [run.ns.s_inode, run.ns.e_inode]
        return run


@contextlib.asynccontextmanager
async def network_manager(base, internet, **kw):
    async with Watched(NetworkConfig(hosts=internet.hosts, system_dns=False)) as net:
        async with running_manager_with(make_config(base, **kw), net) as m:
            yield m, net
        assert net.open_count() == 0
        gone = set(net.inodes) & referenced_netns()
        assert not gone, f"namespaces still referenced: {gone}"
    assert leftovers(base) == {}


@contextlib.asynccontextmanager
async def running_manager_with(config, net):
    from gvisor_mcp.sandbox import Manager

    async with Manager(config, network=net) as m:
        yield m


@pytest.fixture
def rules(internet) -> EgressRules:
    return EgressRules(**internet.policy_egress())


@pytest.fixture
def ca_mount(internet) -> Mount:
    return Mount(destination="/ca", source=str(internet.workdir), type="bind", read_only=True)


def opts(cmd: str, rules, **kw) -> ContainerOptions:
    kw.setdefault("resources", ResourceSpec(timeout=60))
    return ContainerOptions(command=("/bin/sh", "-c", cmd), network=NetworkMode.SANDBOX, egress=rules, **kw)


def rows(result) -> dict[str, dict]:
    return {d["destination"]: d for d in result.network["destinations"]}


@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "warm"])
async def test_allowed_http_and_https_through_the_proxy(sandbox_base, internet, rules, ca_mount, pooled):
    cmd = "curl -sS -m 20 http://web.test/hello && curl -sS -m 20 --cacert /ca/ca.pem https://web.test/hello"
    async with network_manager(sandbox_base, internet) as (m, net):
        runner = WarmManager(m) if pooled else m
        r = await runner.run(opts(cmd, rules, extra_mounts=(ca_mount,)))
    assert r.status is ContainerStatus.EXITED and r.exit_code == 0, (r.summary(), r.stderr)
    lines = r.stdout.decode().splitlines()
    assert lines == [
        f"hello from the test internet path=/hello client={internet.gateway}",
        f"hello from the test internet path=/hello client={internet.gateway}",
    ]
    got = rows(r)
    assert got["web.test:80"]["verdict"] == "allowed" and got["web.test:80"]["bytes_down"] > 0
    assert got["web.test:443"]["verdict"] == "allowed" and got["web.test:443"]["bytes_up"] > 0
    assert r.warm is pooled


async def test_pip_install_from_the_test_index(sandbox_base, internet, rules):
    cmd = (
        "python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target /tmp/site "
        "--index-url http://pypi.test/simple/ --trusted-host pypi.test gvmcp-hello && "
        "PYTHONPATH=/tmp/site python3 -c 'import gvmcp_hello; print(gvmcp_hello.GREETING)'"
    )
    async with network_manager(sandbox_base, internet) as (m, net):
        r = await m.run(opts(cmd, rules, resources=ResourceSpec(timeout=120, memory_mb=512)))
    assert (r.status, r.exit_code) == (ContainerStatus.EXITED, 0), (r.summary(), r.stderr.decode()[-3000:])
    assert r.stdout.decode().strip().endswith("hello from a test wheel")
    assert rows(r)["pypi.test:80"]["verdict"] == "allowed"


async def test_everything_else_is_refused_and_reported(sandbox_base, internet, rules):
    """Denied name, IP literals (the test internet's own host side, metadata,
    the host's loopback), and direct connections without the proxy."""
    cmd = (
        "curl -fsS -m 10 http://evil.example/; echo rc=$?; "
        "curl -fsS -m 10 -p https://evil.example/; echo rc=$?; "
        f"curl -fsS -m 10 http://{internet.gateway}/; echo rc=$?; "
        "curl -fsS -m 10 http://169.254.169.254/latest/meta-data/; echo rc=$?; "
        # NO_PROXY covers loopback names; ask the proxy for them explicitly
        "curl -fsS -m 10 --noproxy '' -x $HTTP_PROXY http://127.0.0.1:22/; echo rc=$?; "
        "curl -fsS -m 10 --noproxy '' -x $HTTP_PROXY http://localhost:22/; echo rc=$?; "
        f"curl -sS -m 10 --noproxy '*' http://{internet.web}/hello; echo direct=$?; "
        "curl -sS -m 10 --noproxy '*' http://169.254.169.254/; echo direct=$?; "
        "getent hosts web.test; echo dns=$?"
    )
    async with network_manager(sandbox_base, internet) as (m, net):
        r = await m.run(opts(cmd, rules))
    out = r.stdout.decode()
    assert r.status is ContainerStatus.EXITED, r.summary()
    assert "rc=0" not in out and "direct=0" not in out and "dns=0" not in out, out
    assert "hello from the test internet" not in out
    got = rows(r)
    assert got["evil.example:80"]["reason"] == "not in the egress allowlist"
    assert got["evil.example:443"]["verdict"] == "denied"
    for literal in (f"{internet.gateway}:80", "169.254.169.254:80", "127.0.0.1:22"):
        assert got[literal]["verdict"] == "denied" and "IP address" in got[literal]["reason"], got
    assert got["localhost:22"]["verdict"] == "denied"
    assert f"{internet.web}:80" not in got  # the direct attempt never reached the proxy
    assert r.network["denied"] == len(got)


async def test_request_narrowed_rules_and_a_name_resolving_to_a_private_address(sandbox_base, internet, rules):
    only_pypi = rules.narrowed(["pypi.test", f"{internet.pypi}/32"])
    assert [r.ports for r in only_pypi.allow] == [(80, 443), (80,)]
    no_cidr = EgressRules(allow=["web.test"])
    async with network_manager(sandbox_base, internet) as (m, net):
        a = await m.run(opts("curl -sS -m 10 http://web.test/hello", only_pypi))
        b = await m.run(opts("curl -sS -m 10 http://web.test/hello", no_cidr))
    assert rows(a)["web.test:80"]["reason"] == "not in the egress allowlist"
    reason = rows(b)["web.test:80"]["reason"]
    assert reason.startswith(f"resolves to {internet.web}, a non-public address"), reason


async def test_another_runs_proxy_is_unreachable(sandbox_base, internet, rules):
    async with network_manager(sandbox_base, internet) as (m, net):
        async with anyio.create_task_group() as tg:
            first: dict = {}

            async def hold() -> None:
                first["r"] = await m.run(opts("echo $HTTP_PROXY; sleep 30", rules), run_id="holder")

            tg.start_soon(hold)
            with anyio.fail_after(60):
                while not (m.active_run("holder") and _proxy_of(net)):
                    await anyio.sleep(0.05)
            other = _proxy_of(net)
            r = await m.run(opts(f"curl -sS -m 10 -x {other} http://web.test/hello; echo rc=$?", rules))
            await m.kill("holder")
    assert "hello from the test internet" not in r.stdout.decode()
    assert "rc=7" in r.stdout.decode(), (r.stdout, r.stderr)  # curl: could not connect
    assert rows(r) == {}


def _proxy_of(net) -> str | None:
    """The proxy of the run in progress (not a spare's namespace waiting for a run)."""
    runs = [run for run in net._open.values() if run.started]
    return runs[0].proxy_url if runs else None


async def test_limits_connections_and_bytes(sandbox_base, internet, rules):
    small = rules.model_copy(update={"max_bytes": 100_000})
    cmd = "curl -sS -m 20 -o /dev/null http://web.test/bytes/1000000; echo rc=$?; curl -sS -m 10 http://web.test/hello; echo rc=$?"
    async with network_manager(sandbox_base, internet) as (m, net):
        r = await m.run(opts(cmd, small))
    flows = r.network["destinations"]
    assert any(f["verdict"] == "failed" and "byte limit" in f["reason"] for f in flows), flows
    assert any(f["verdict"] == "denied" and "byte limit" in f["reason"] for f in flows), flows
    assert "hello from the test internet" not in r.stdout.decode()


@pytest.mark.parametrize("end", ["timeout", "kill"])
async def test_nothing_left_after_timeout_or_kill(sandbox_base, internet, rules, end):
    async with network_manager(sandbox_base, internet) as (m, net):
        if end == "timeout":
            r = await m.run(opts("curl -sS http://web.test/hello; sleep 60", rules, resources=ResourceSpec(timeout=3)))
            assert r.status is ContainerStatus.TIMED_OUT
        else:
            async with anyio.create_task_group() as tg:
                box = {}

                async def go() -> None:
                    box["r"] = await m.run(opts("curl -sS http://web.test/hello; sleep 60", rules), run_id="k")

                tg.start_soon(go)
                with anyio.fail_after(60):
                    while not m.active_run("k") or net.open_count(started=True) == 0:
                        await anyio.sleep(0.05)
                await anyio.sleep(1.0)
                await m.kill("k")
            r = box["r"]
            assert r.status is ContainerStatus.KILLED
        # A cold run is answered first and torn down right after (issue 18): its
        # namespace goes with the teardown, not necessarily before the answer.
        # (Spares' namespaces, waiting for the next run, stay until the Manager closes.)
        with anyio.fail_after(60):
            while net.open_count(started=True):
                await anyio.sleep(0.05)
    # network_manager checked: no namespace referenced, no runsc leftovers


async def test_namespace_failure_is_an_error_not_another_network(sandbox_base, internet, rules, monkeypatch):
    def broken(slot, port=3128):
        raise NetnsError("injected: no namespace for you")

    monkeypatch.setattr(service_mod, "create", broken)
    async with network_manager(sandbox_base, internet) as (m, net):
        with pytest.raises(SandboxError, match="network namespace.*injected"):
            await m.run(opts("echo should-not-run", rules))


async def test_proxy_failure_ends_the_run_as_error(sandbox_base, internet, rules, monkeypatch):
    async def dying(self):
        await anyio.sleep(1.0)
        self.failure = "egress proxy failed: injected"
        raise RuntimeError("injected")

    monkeypatch.setattr(service_mod.RunProxy, "serve", dying)
    async with network_manager(sandbox_base, internet) as (m, net):
        r = await m.run(opts("sleep 30", rules))
    assert r.status is ContainerStatus.ERROR and "injected" in (r.error or ""), r.summary()


async def test_a_cold_sandbox_run_takes_a_spare_with_its_namespace_made_ahead(sandbox_base, internet, rules):
    """The second cold run of a shape takes a started spare (spares.py): its
    namespaces were opened when the spare was made, and bound to this run,
    its egress rules and its accounting at the go; the run's teardown
    closes them, and a new spare (new namespaces) replaces it."""
    cmd = "curl -sS -m 20 http://web.test/hello; curl -fsS -m 10 http://evil.example/; echo rc=$?"
    async with network_manager(sandbox_base, internet) as (m, net):
        first = await m.run(opts(cmd, rules))
        host = m._entered.host
        key = (mountpoints_of(first_opts := opts(cmd, rules)), spare_shape(host, first_opts))
        assert key[1] == "sandbox"
        with anyio.fail_after(60):
            while host.spares.wanted(*key) or net.open_count(started=False) < spares_mod.PER_KEY:
                await anyio.sleep(0.05)
        waiting = {run.container_id: run for run in net._open.values() if not run.started}
        assert set(waiting) == host.spares.names()
        second = await m.run(opts(cmd, rules))
        assert second.container_id in waiting and first.container_id not in waiting
        assert waiting[second.container_id].started  # the spare's own namespace served the run
        with anyio.fail_after(60):  # its teardown closes it; a new spare replaces the one taken
            while second.container_id in net._open or host.spares.wanted(*key):
                await anyio.sleep(0.05)
        assert net.open_count(started=True) == 0 and net.open_count() == spares_mod.PER_KEY
    for r in (first, second):
        assert (r.status, r.warm) == (ContainerStatus.EXITED, False), r.summary()
        assert r.stdout.decode() == f"hello from the test internet path=/hello client={internet.gateway}\nrc=22\n"
        got = rows(r)
        assert got["web.test:80"]["verdict"] == "allowed" and got["evil.example:80"]["verdict"] == "denied", got
    # network_manager checked: every namespace made (the spares' too) is gone, nothing left
