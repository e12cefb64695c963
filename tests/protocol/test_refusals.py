"""One refusal path (issue 15 item 3): every refusal the model can cause reads the
same way, writes one audit line and counts once in gvisor_mcp_denials_total.

Each kind through the real server over stdio: a value outside a schema enum
(network, image), a ceiling, an egress rule outside the policy, the
concurrency quota and the call rate. The client gets an error result whose
text says what was asked, what is allowed and how to ask again.
"""

from __future__ import annotations

import json
import socket

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import run, text

POLICY = """\
version: 1
ceilings:
  memory: 512MiB
on_exceed: reject
network:
  allowed: [none, sandbox]
  egress:
    allow: [pypi.org]
quotas:
  max_concurrent: 1
  runs_per_minute: {rate}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def denials(port: int) -> dict[str, float]:
    """gvisor_mcp_denials_total by kind, for tenant default."""
    async with httpx2.AsyncClient() as http:
        with anyio.fail_after(30):
            while True:
                try:
                    r = await http.get(f"http://127.0.0.1:{port}/metrics")
                    break
                except httpx2.TransportError:
                    await anyio.sleep(0.1)
    return {
        dict(s.labels)["kind"]: s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if s.name == "gvisor_mcp_denials_total" and dict(s.labels).get("tenant") == "default"
    }


def audit_lines(state) -> list[dict]:
    path = state / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def policy(tmp_path):
    def write(rate: int = 60):
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY.format(rate=rate))
        return path

    return write


@pytest.mark.parametrize(
    "args, asked, allowed",
    [
        ({"network": "host"}, "network='host'", "allowed is one of 'none', 'sandbox'"),
        ({"image": "debian:sid"}, "image='debian:sid'", "allowed is one of"),
        ({"memory_mb": 100000}, "memory_mb=100000", "allowed is"),
        ({"network": "sandbox", "egress": ["evil.example"]}, "egress=['evil.example']", "allowed is"),
    ],
)
async def test_a_refused_value_reads_like_the_policy_and_is_audited_and_counted(
    serve, sandbox_base, policy, args, asked, allowed
):
    port = free_port()
    async with serve("--policy", str(policy()), "--pool-size", "0", "--metrics-port", str(port)) as c:
        r = await run(c, command="echo never", **args)
        assert r.is_error
        msg = text(r)
        assert f"Policy denied {asked}" in msg, msg
        assert allowed in msg and "ask again" in msg.lower(), msg
        assert "pydantic" not in msg and "literal_error" not in msg, msg
        counted = await denials(port)
    [entry] = audit_lines(sandbox_base / "state")
    assert entry["decision"] == "denied" and entry["tool"] == "execute_command"
    assert entry["tenant"] == "default" and entry["command"] == "echo never"
    assert entry["reason"] == msg and len(entry["policy_hash"]) == 64
    assert counted == {"policy": 1.0}


async def test_the_concurrency_quota_is_one_refusal_with_its_audit_line_and_count(serve, sandbox_base, policy):
    port = free_port()
    async with serve("--policy", str(policy()), "--pool-size", "0", "--metrics-port", str(port)) as c:
        first = await run(c, command="sleep 60", background=True)
        assert not first.is_error
        r = await run(c, command="echo second")
        assert r.is_error
        msg = text(r)
        assert "max_concurrent=1" in msg and "retry" in msg, msg
        counted = await denials(port)
        await c.call_tool("cancel_command", {"result_id": first.structured_content["result_id"]})
    refused = [e for e in audit_lines(sandbox_base / "state") if e["decision"] != "allowed"]
    assert [(e["decision"], e["command"], e["reason"]) for e in refused] == [("quota", "echo second", msg)]
    assert counted == {"quota": 1.0}


async def test_the_call_rate_is_one_refusal_with_its_audit_line_and_count(serve, sandbox_base, policy):
    port = free_port()
    async with serve("--policy", str(policy(rate=1)), "--pool-size", "0", "--metrics-port", str(port)) as c:
        assert not (await run(c, command="true")).is_error
        r = await run(c, command="echo again")
        assert r.is_error
        msg = text(r)
        assert "runs_per_minute=1" in msg and "retry in" in msg, msg
        counted = await denials(port)
    refused = [e for e in audit_lines(sandbox_base / "state") if e["decision"] != "allowed"]
    assert [(e["decision"], e["command"], e["reason"]) for e in refused] == [("quota", "echo again", msg)]
    assert counted == {"rate": 1.0}


async def test_a_wrong_type_is_refused_on_the_same_path(serve, sandbox_base, policy):
    port = free_port()
    async with serve("--policy", str(policy()), "--pool-size", "0", "--metrics-port", str(port)) as c:
        r = await run(c, command="echo never", background="yes")
        assert r.is_error
        msg = text(r)
        assert "background='yes' is not accepted: expected a JSON boolean" in msg, msg
        counted = await denials(port)
    [entry] = audit_lines(sandbox_base / "state")
    assert (entry["decision"], entry["reason"], entry["tool"]) == ("denied", msg, "execute_command")
    assert counted == {"arguments": 1.0}
