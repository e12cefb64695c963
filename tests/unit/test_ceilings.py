"""Every limit at exactly its ceiling (granted) and one step above it (refused).

A ceiling off by one (`>=` for `>`, or the other way) passed every unit and
property test before this file; each case here fails on such a change. The
step is the smallest a request can express: 1 for counts and MiB, 1 byte
for sizes, 0.01 CPU (the minimum cpus), 1 ms of timeout.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gvisor_mcp.jobs import CallRate, Job, Jobs, QuotaExceeded
from gvisor_mcp.policy import ExecRequest, PolicyDenied, loads, resolve
from gvisor_mcp.policy.resolve import MAX_STDIN_BYTES
from gvisor_mcp.sandbox import ManagerConfig

ROOT = Path("/srv/state/workspaces")
POLICY = """version: 1
defaults: {cpus: 0.5, memory: 128MiB, max_pids: 32, timeout: 10s}
ceilings: {cpus: 1.5, memory: 256MiB, max_pids: 64, timeout: 30s}
env: {max_vars: 3, max_bytes: 100}
quotas: {max_concurrent: 2, runs_per_minute: 5}
"""
REJECT = loads(POLICY, "reject.yaml")
CLAMP = loads(POLICY + "on_exceed: clamp\n", "clamp.yaml")


def run(policy, **fields):  # type: ignore[no-untyped-def]
    fields.setdefault("command", "true")
    return resolve(policy, ExecRequest(**fields), "default", workspace_root=ROOT, session_id="s")


RESOURCES = [  # (request field, ceiling, one step above, attribute of the granted resources)
    ("cpus", 1.5, 1.51, "cpus"),
    ("memory_mb", 256, 257, "memory_mb"),
    ("max_pids", 64, 65, "max_pids"),
    ("timeout_seconds", 30.0, 30.001, "timeout"),
]


@pytest.mark.parametrize("field, ceiling, above, attr", RESOURCES)
def test_a_resource_at_its_ceiling_is_granted_and_one_step_above_is_refused(field, ceiling, above, attr):
    r = run(REJECT, **{field: ceiling})
    assert getattr(r.options.resources, attr) == ceiling
    assert r.receipt.get(field).rule == "requested"
    with pytest.raises(PolicyDenied) as e:
        run(REJECT, **{field: above})
    assert e.value.field == field and f"{ceiling:g}" in str(e.value)


@pytest.mark.parametrize("field, ceiling, above, attr", RESOURCES)
def test_clamping_starts_one_step_above_the_ceiling(field, ceiling, above, attr):
    assert run(CLAMP, **{field: ceiling}).receipt.get(field).rule == "requested"
    r = run(CLAMP, **{field: above})
    assert getattr(r.options.resources, attr) == ceiling
    entry = r.receipt.get(field)
    assert (entry.requested, entry.granted, entry.rule) == (above, ceiling, "clamped to ceiling")


def test_env_variable_count_at_its_ceiling_and_one_above():
    three = {"A": "1", "B": "2", "C": "3"}
    assert sorted(run(REJECT, env=three).options.env) == ["A", "B", "C"]
    with pytest.raises(PolicyDenied, match="at most 3 variables"):
        run(REJECT, env={**three, "D": "4"})


def test_env_bytes_at_their_ceiling_and_one_above():
    # len(key) + len(value) + 2 per variable: 1 + 97 + 2 = 100 bytes
    assert run(REJECT, env={"K": "v" * 97}).options.env["K"] == "v" * 97
    with pytest.raises(PolicyDenied, match="<101 bytes>.*at most 100B of variables"):
        run(REJECT, env={"K": "v" * 98})


def test_stdin_at_its_ceiling_and_one_byte_above():
    assert run(REJECT, stdin="x" * MAX_STDIN_BYTES).options.stdin is not None
    with pytest.raises(PolicyDenied, match="at most 4MiB"):
        run(REJECT, stdin="x" * (MAX_STDIN_BYTES + 1))


def test_workdir_at_4096_bytes_and_one_above():
    def path(n: int) -> str:
        parts, size = [], 0
        while size < n:
            piece = "d" * min(200, n - size - 1)
            parts.append(piece)
            size += 1 + len(piece)
        return "/" + "/".join(parts)

    assert len(path(4096).encode()) == 4096 and len(path(4097).encode()) == 4097
    assert run(REJECT, workdir=path(4096)).options.workdir == path(4096)
    with pytest.raises(PolicyDenied, match="workdir"):
        run(REJECT, workdir=path(4097))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_runs_per_minute_at_its_ceiling_and_one_above():
    clock = Clock()
    rate = CallRate(clock)
    for _ in range(5):  # exactly runs_per_minute calls in a minute: all counted, none refused
        rate.count("a", 5)
        clock.t += 1
    with pytest.raises(QuotaExceeded, match=r"runs_per_minute=5\); retry in 55 s"):
        rate.count("a", 5)  # the sixth
    rate.count("b", 5)  # another tenant has its own window
    clock.t = 1000.0 + 59.999
    with pytest.raises(QuotaExceeded):
        rate.count("a", 5)  # the first call is still inside the window
    clock.t = 1000.0 + 60
    rate.count("a", 5)  # ...and now it is not: one slot is free again
    with pytest.raises(QuotaExceeded):
        rate.count("a", 5)


def test_refused_calls_are_not_counted_twice():
    """A call refused by the rate does not count: the window empties after a minute of refusals."""
    clock = Clock()
    rate = CallRate(clock)
    rate.count("a", 1)
    for _ in range(100):
        clock.t += 0.5
        with pytest.raises(QuotaExceeded):
            rate.count("a", 1)
    clock.t = 1000.0 + 60
    rate.count("a", 1)


def test_max_concurrent_at_its_ceiling_and_one_above(tmp_path):
    jobs = Jobs(SimpleNamespace(config=ManagerConfig()), None, None, None)  # type: ignore[arg-type]
    for i in range(2):
        jobs.admit("a", 2)  # 0, then 1 running: below the quota
        jobs._jobs[f"r{i}"] = Job(result_id=f"r{i}", tenant="a", session=None, command="sleep 9", limits={}, timeout=10)
    with pytest.raises(QuotaExceeded, match=r"already has 2 command\(s\) running \(max_concurrent=2\)"):
        jobs.admit("a", 2)
    jobs.admit("b", 2)  # per tenant
