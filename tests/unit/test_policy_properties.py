"""Properties that hold for ANY request: ceilings, networks, mounts and tenant are the policy's."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gvisor_mcp.images.store import ImageStore
from gvisor_mcp.policy import ExecRequest, PolicyDenied, PolicyError, load, loads, resolve
from gvisor_mcp.policy.resolve import workspace_host_path

from ..images_helpers import store_with

# Hypothesis at full strength (seconds per test), and the image store's unpack
# gives files their owners (root only).
pytestmark = [pytest.mark.slow, pytest.mark.runsc]

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/srv/state/workspaces")


@functools.cache
def images() -> ImageStore:
    """A real store holding the store images the shipped policies name (made
    once, when a test first needs it)."""
    return store_with(Path(tempfile.mkdtemp(prefix="gvisor-mcp-test-images-")) / "images", "agent")


POLICIES = {path.name: load(path) for path in sorted((REPO / "policies").glob("*.yaml"))}
POLICIES["clamp-everything"] = loads(
    """\
version: 1
on_exceed: clamp
network: {allowed: [none, sandbox]}
env: {allow: ["*"], deny: []}
tenants:
  big:
    allow_above_ceilings: true
    ceilings: {cpus: 16, memory: 64GiB, max_pids: 100000, timeout: 1d}
    network: {allowed: [none, sandbox, host]}
  small:
    ceilings: {cpus: 1, memory: 512MiB, max_pids: 256, timeout: 2m}
    workspace: {scope: tenant}
""",
    "inline.yaml",
)
CASES = [(name, tenant) for name, p in POLICIES.items() for tenant in p.tenant_names]

numbers = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**40), 2**40)
ints = st.none() | st.integers(-(2**40), 2**40)
text = st.text(max_size=40)
requests = st.builds(
    ExecRequest,
    command=st.text(min_size=1, max_size=200),
    workdir=st.none() | text | st.sampled_from(["/", "/workspace", "..", "/etc/../root", "/srv/state/workspaces"]),
    env=st.none()
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["LD_PRELOAD", "PATH", "APP_X", "TZ"]), text, max_size=5),
    stdin=st.none() | text,
    timeout_seconds=numbers,
    cpus=numbers,
    memory_mb=ints,
    max_pids=ints,
    network=st.none() | st.sampled_from(["none", "sandbox", "host", "bridge", ""]) | text,
    image=st.none() | st.sampled_from(["host", "py", "/", "../host"]) | text,
)


@pytest.mark.parametrize(("policy_name", "tenant"), CASES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests, session=st.text(min_size=1, max_size=80))
def test_any_request_stays_within_the_tenants_policy(
    policy_name: str, tenant: str, request: ExecRequest, session: str
) -> None:
    policy = POLICIES[policy_name]
    s = policy.tenant(tenant)
    try:
        r = resolve(policy, request, tenant, workspace_root=ROOT, session_id=session, images=images())
    except PolicyDenied as e:
        assert str(e).startswith("Policy denied ") and e.field
        return
    res = r.options.resources
    assert 0.01 <= res.cpus <= s.ceilings.cpus
    assert 16 <= res.memory_mb <= s.ceilings.memory
    assert 4 <= res.max_pids <= s.ceilings.max_pids
    assert 0 < res.timeout <= s.ceilings.timeout and math.isfinite(res.timeout)
    assert res.max_output_bytes == s.defaults.max_output <= s.ceilings.max_output
    assert r.options.network.value in s.network.allowed
    image = r.receipt.get("image").granted
    assert image in s.images.allowed
    entry = s.images.catalog.get(image)
    if entry is not None and entry.store is not None:
        stored = images().get(entry.store)
        assert (r.options.rootfs, r.receipt.image_digest) == (stored.rootfs, stored.digest)
    else:
        assert r.options.rootfs == (None if image == "host" else entry.path)
        assert r.receipt.image_digest is None
    assert r.options.read_only_rootfs == (image != "host" and not s.images.catalog[image].writable)
    # identity is the server's, whatever the request says
    assert r.receipt.tenant == tenant and r.settings.name == tenant
    assert r.receipt.policy_sha256 == policy.sha256
    assert r.options.user is not None and f"{r.options.user.uid}:{r.options.user.gid}" == s.defaults.user
    # no mount source comes from the request: the only mount is the derived workspace
    if s.workspace.enabled:
        expected = workspace_host_path(ROOT, tenant, s.workspace.scope, session)
        assert [m.source for m in r.options.extra_mounts] == [str(expected)]
        assert (ROOT / tenant) in expected.parents
        assert ".." not in expected.parts
    else:
        assert r.options.extra_mounts == ()
    # fixed environment variables cannot be overridden
    for key, value in s.env.set.items():
        assert r.options.env is not None and r.options.env[key] == value
    assert r.options.command[:2] == ("/bin/sh", "-c")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400))
def test_loader_never_raises_anything_but_policy_error(data: str | bytes) -> None:
    try:
        loads(data, "fuzz.yaml")
    except PolicyError as e:
        assert e.problems and all(str(p).startswith("fuzz.yaml:") for p in e.problems)


KEYS = st.sampled_from(
    [
        "version",
        "defaults",
        "ceilings",
        "memory",
        "cpus",
        "timeout",
        "tenants",
        "a",
        "extends",
        "network",
        "allowed",
        "env",
        "set",
        "images",
        "catalog",
        "workspace",
        "bogus",
    ]
)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.sampled_from(["1GiB", "2m", "none", "host", "a", "x"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_structured_fuzz_gives_located_errors_or_a_policy(doc: dict) -> None:  # type: ignore[type-arg]
    import yaml

    text = yaml.safe_dump({"version": 1, **doc})
    try:
        policy = loads(text, "fuzz.yaml")
    except PolicyError as e:
        for p in e.problems:
            assert p.line >= 1 and p.expected, str(p)
        return
    for name in policy.tenant_names:
        t = policy.tenant(name)
        assert t.defaults.memory <= t.ceilings.memory
        assert t.defaults.network in t.network.allowed
