"""The warm pool as an operator's Prometheus scrape shows it: a real
`gvisor-mcp serve` over stdio with --metrics-port, real runsc underneath.
gvisor_mcp_pool_frozen counts the pooled sandboxes frozen after idling
--pool-freeze-after seconds (sandbox/pool.py), and drops when one is claimed."""

from __future__ import annotations

import socket

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gvisor_mcp.sandbox.cgroups import CGROUP_ROOT

from .conftest import run, structured

pytestmark = pytest.mark.skipif(
    not (CGROUP_ROOT / "freezer" / "cgroup.procs").exists(), reason="no v1 freezer hierarchy"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _scrape(http: httpx2.AsyncClient, port: int) -> dict[str, float]:
    """One scrape's samples, by name (with `{label=value}` when labelled)."""
    with anyio.fail_after(30):
        while True:
            try:
                r = await http.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx2.TransportError:  # not listening yet
                await anyio.sleep(0.1)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def _scrape_until(http: httpx2.AsyncClient, port: int, **want: float) -> dict[str, float]:
    with anyio.fail_after(60):
        while True:
            got = await _scrape(http, port)
            if all(got.get(f"gvisor_mcp_{k}") == v for k, v in want.items()):
                return got
            await anyio.sleep(0.05)


async def test_the_frozen_gauge_counts_a_frozen_pooled_sandbox_until_it_is_claimed(serve, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nforeground_limit: 1s\n")
    port = _free_port()
    # --max-concurrent 1: while the claimed run holds the only slot, no
    # replacement boots (and freezes) behind it, so the scrape during the
    # run has one answer.
    flags = ("--policy", str(policy), "--pool-size", "1", "--pool-freeze-after", "0.2", "--max-concurrent", "1")
    async with serve("--metrics-port", str(port), *flags) as c, httpx2.AsyncClient() as http:
        got = await _scrape(http, port)
        assert got["gvisor_mcp_pool_frozen"] in (0, 1)  # exported from the start
        await _scrape_until(http, port, pool_idle=1, pool_frozen=1)
        s = structured(await run(c, command="sleep 600"))
        assert s["status"] == "running", s  # past the foreground limit: still claimed
        got = await _scrape(http, port)
        now = (got["gvisor_mcp_active_containers"], got["gvisor_mcp_pool_idle"], got["gvisor_mcp_pool_frozen"])
        assert now == (1, 0, 0), got
        r = structured(await c.call_tool("cancel_command", {"result_id": s["result_id"]}))
        assert r["status"] == "killed", r
        # Its replacement boots, idles and is frozen in turn.
        got = await _scrape_until(http, port, active_containers=0, pool_idle=1, pool_frozen=1)
        assert got["gvisor_mcp_pool_claims_total{result=hit}"] == 1, got  # it was the frozen one claimed
