"""resolve(): defaults, clamp, reject, tenants, env, images, workdir and workspace paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from gvisor_mcp.policy import (
    ExecRequest,
    PolicyDenied,
    UnknownTenant,
    load,
    load_default,
    loads,
    path_component,
    resolve,
)
from gvisor_mcp.sandbox.options import ContainerOptions, NetworkMode

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/srv/state/workspaces")


def run(policy, tenant="default", session="s1", **fields):  # type: ignore[no-untyped-def]
    fields.setdefault("command", "echo hi")
    return resolve(policy, ExecRequest(**fields), tenant, workspace_root=ROOT, session_id=session)


def denied(policy, tenant="default", **fields) -> PolicyDenied:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyDenied) as e:
        run(policy, tenant, **fields)
    return e.value


CLAMP = loads("version: 1\non_exceed: clamp\n", "clamp.yaml")


def test_defaults_fill_everything() -> None:
    policy = load_default()
    r = run(policy)
    o = r.options
    assert o.command == ("/bin/sh", "-c", "echo hi")
    assert (o.resources.cpus, o.resources.memory_mb, o.resources.max_pids, o.resources.timeout) == (
        1.0,
        512,
        256,
        120.0,
    )
    assert o.resources.max_output_bytes == 10 * 1024 * 1024
    assert o.network is NetworkMode.NONE
    assert o.rootfs is None
    assert o.workdir == "/workspace"
    assert o.user is not None and (o.user.uid, o.user.gid) == (1000, 1000)
    for field in ("timeout_seconds", "cpus", "memory_mb", "max_pids", "network", "image", "workdir", "env"):
        assert r.receipt.get(field).rule == "default", field
    for field in ("user", "max_output_bytes", "workspace"):
        assert r.receipt.get(field).rule == "policy"
    assert r.receipt.tenant == "default"
    assert r.receipt.policy_sha256 == policy.sha256
    assert r.receipt.notes == ()
    assert (r.output.head, r.output.tail, r.quotas.max_concurrent, r.foreground_limit) == (4096, 4096, 4, 45.0)
    assert (r.settings.head_bytes, r.settings.max_concurrent, r.settings.foreground_limit) == (4096, 4, 45.0)
    # the options pass the sandbox's own validation again
    assert ContainerOptions.model_validate(o.model_dump()) == o


@pytest.mark.parametrize(
    ("field", "asked", "attr"),
    [
        ("timeout_seconds", 300.0, "timeout"),
        ("cpus", 1.5, "cpus"),
        ("memory_mb", 1024, "memory_mb"),
        ("max_pids", 512, "max_pids"),
    ],
)
def test_within_ceiling_is_granted(field: str, asked: float, attr: str) -> None:
    r = run(load_default(), **{field: asked})
    assert getattr(r.options.resources, attr) == asked
    entry = r.receipt.get(field)
    assert (entry.requested, entry.granted, entry.rule) == (asked, asked, "requested")


@pytest.mark.parametrize(
    ("field", "asked", "ceiling", "attr"),
    [
        ("timeout_seconds", 3600.0, 600.0, "timeout"),
        ("cpus", 64.0, 2.0, "cpus"),
        ("memory_mb", 65536, 2048, "memory_mb"),
        ("max_pids", 100000, 1024, "max_pids"),
    ],
)
def test_over_ceiling_reject_and_clamp(field: str, asked: float, ceiling: float, attr: str) -> None:
    e = denied(load_default(), **{field: asked})
    assert e.field == field and e.requested == asked
    text = str(e)
    assert text.startswith(f"Policy denied {field}=")
    assert f"{ceiling:g}" in text and "Ask again" in text and f"leave {field} out" in text

    r = run(CLAMP, **{field: asked})
    assert getattr(r.options.resources, attr) == ceiling
    entry = r.receipt.get(field)
    assert (entry.requested, entry.granted, entry.rule, entry.limit) == (asked, ceiling, "clamped to ceiling", ceiling)
    assert any(field in n and "clamped" in n for n in r.receipt.notes)


@pytest.mark.parametrize(
    ("field", "asked"),
    [
        ("memory_mb", 8),
        ("cpus", 0.001),
        ("max_pids", 2),
        ("timeout_seconds", 0.0),
        ("memory_mb", -1),
        ("cpus", float("nan")),
        ("timeout_seconds", float("inf")),
    ],
)
def test_below_minimum_or_not_finite_is_denied_even_with_clamp(field: str, asked: float) -> None:
    e = denied(CLAMP, **{field: asked})
    assert e.field == field


def test_denial_message_for_agents() -> None:
    e = denied(load_default(), memory_mb=4096)
    assert str(e) == (
        "Policy denied memory_mb=4096: allowed is 16 MiB to 2048 MiB (default 512 MiB). "
        "Ask again with memory_mb at most 2048, or leave memory_mb out to get 512."
    )


NET = loads(
    """\
version: 1
network: {allowed: [none, sandbox]}
tenants:
  trusted:
    allow_above_ceilings: true
    network: {allowed: [none, sandbox, host]}
""",
    "net.yaml",
)


@pytest.mark.parametrize(
    ("tenant", "asked", "outcome"),
    [
        ("default", None, "none"),
        ("default", "none", "none"),
        ("default", "sandbox", "sandbox"),
        ("default", "host", PolicyDenied),
        ("default", "wifi", PolicyDenied),
        ("trusted", "host", "host"),
    ],
)
def test_network_rules(tenant: str, asked: str | None, outcome: object) -> None:
    if outcome is PolicyDenied:
        e = denied(NET, tenant, network=asked)
        assert e.field == "network" and "one of: none, sandbox" in str(e)
    else:
        assert run(NET, tenant, network=asked).options.network.value == outcome


def test_host_network_never_implied() -> None:
    for path in sorted((REPO / "policies").glob("*.yaml")):
        policy = load(path)
        for name in policy.tenant_names:
            assert "host" not in policy.tenant(name).network.allowed, (path, name)
            with pytest.raises(PolicyDenied):
                run(policy, name, network="host")


def test_network_enum_is_accepted() -> None:
    assert run(NET, network=NetworkMode.SANDBOX).options.network is NetworkMode.SANDBOX


@pytest.fixture
def images(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "py").mkdir()
    (tmp_path / "node").mkdir()
    return loads(
        f"""\
version: 1
images:
  catalog: {{py: {tmp_path}/py, node: {tmp_path}/node}}
  allowed: [host, py]
tenants:
  js:
    images: {{allowed: [node]}}
    defaults: {{image: node}}
""",
        "images.yaml",
    ), tmp_path


def test_image_rules(images) -> None:  # type: ignore[no-untyped-def]
    policy, base = images
    assert run(policy).options.rootfs is None
    assert run(policy, image="host").options.rootfs is None
    assert run(policy, image="py").options.rootfs == f"{base}/py"
    e = denied(policy, image="node")
    assert e.field == "image" and "one of host, py" in str(e)
    denied(policy, image="/etc")
    r = run(policy, "js")
    assert r.options.rootfs == f"{base}/node" and r.receipt.get("image").rule == "default"
    denied(policy, "js", image="host")


def test_tenant_inheritance_in_resolution() -> None:
    policy = load(REPO / "policies" / "multi-tenant.yaml")
    ci, intern, research = (run(policy, t) for t in ("ci", "intern", "research"))
    assert ci.options.resources.timeout == 600.0 and ci.options.resources.memory_mb == 1024
    assert intern.options.resources == ci.options.resources
    assert intern.quotas.max_concurrent == 1 and ci.quotas.max_concurrent == 3
    assert ci.options.env == {"LANG": "C.UTF-8", "CI": "true"}
    # research is above the top-level ceilings (said explicitly) and rejects
    assert run(policy, "research", memory_mb=8192).options.resources.memory_mb == 8192
    denied(policy, "research", memory_mb=32768)
    # the top level clamps
    assert run(policy, memory_mb=8192).options.resources.memory_mb == 2048
    assert run(policy, "research", network="sandbox").options.network is NetworkMode.SANDBOX
    denied(policy, "ci", network="sandbox")
    assert research.receipt.tenant == "research"


def test_unknown_tenant() -> None:
    with pytest.raises(UnknownTenant):
        run(load_default(), "nobody")


ENV = loads(
    """\
version: 1
env:
  set: {LANG: C.UTF-8, TZ: UTC}
  allow: ["APP_*", DEBUG]
  deny: ["APP_SECRET*", "LD_*"]
  max_vars: 3
  max_bytes: 64
""",
    "env.yaml",
)


@pytest.mark.parametrize(
    ("env", "outcome"),
    [
        (None, {"LANG": "C.UTF-8", "TZ": "UTC"}),
        ({"APP_MODE": "x"}, {"LANG": "C.UTF-8", "TZ": "UTC", "APP_MODE": "x"}),
        ({"DEBUG": "1", "APP_A": "a"}, {"LANG": "C.UTF-8", "TZ": "UTC", "DEBUG": "1", "APP_A": "a"}),
        ({"APP_SECRET_KEY": "x"}, "env.APP_SECRET_KEY"),  # deny wins over allow
        ({"LD_PRELOAD": "/x.so"}, "env.LD_PRELOAD"),
        ({"HOME": "/root"}, "env.HOME"),  # not in allow
        ({"debug": "1"}, "env.debug"),  # patterns are case-sensitive
        ({"TZ": "Europe/Paris"}, "env.TZ"),  # fixed by the policy
        ({"APP_A": "1", "APP_B": "2", "APP_C": "3", "APP_D": "4"}, "env"),  # too many
        ({"APP_A": "x" * 100}, "env"),  # too many bytes
        ({"APP A": "x"}, "env"),  # not a name
        ({"APP_A": "a\x00b"}, "env.APP_A"),
    ],
)
def test_env_rules(env: dict[str, str] | None, outcome: object) -> None:
    if isinstance(outcome, dict):
        r = run(ENV, env=env)
        assert r.options.env == outcome
        assert r.receipt.get("env").granted == sorted(outcome)
    else:
        e = denied(ENV, env=env)
        assert e.field == outcome
        assert "Ask again" in str(e) or "Leave" in str(e) or "Rename" in str(e) or "Fix" in str(e)


def test_default_env_denies_loader_variables() -> None:
    for key in ("LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV"):
        assert denied(load_default(), env={key: "x"}).field == f"env.{key}"
    assert run(load_default(), env={"MY_VAR": "1"}).options.env == {"MY_VAR": "1"}


@pytest.mark.parametrize(
    ("asked", "granted"),
    [
        (None, "/workspace"),
        ("/tmp", "/tmp"),
        ("src", "/workspace/src"),
        ("src/./lib/", "/workspace/src/lib"),
        ("/", "/"),
        ("..", PolicyDenied),
        ("/workspace/../etc", PolicyDenied),
        ("a\x00b", PolicyDenied),
        ("", PolicyDenied),
    ],
)
def test_workdir(asked: str | None, granted: object) -> None:
    if granted is PolicyDenied:
        assert denied(load_default(), workdir=asked).field == "workdir"
    else:
        assert run(load_default(), workdir=asked).options.workdir == granted


def test_workdir_defaults_to_tmp_without_workspace() -> None:
    policy = loads("version: 1\nworkspace: {enabled: false}\n")
    r = run(policy)
    assert r.options.workdir == "/tmp" and r.options.extra_mounts == () and r.workspace is None
    assert resolve(policy, ExecRequest(command="x"), "default", workspace_root=None, session_id=None)


@pytest.mark.parametrize(
    ("scope", "tenant", "session", "expected"),
    [
        ("session", "default", "abc123", ROOT / "default" / "sessions" / "abc123"),
        ("tenant", "default", "abc123", ROOT / "default" / "shared"),
        ("tenant", "default", None, ROOT / "default" / "shared"),
        ("session", "default", "shared", ROOT / "default" / "sessions" / "shared"),
        ("session", "default", "../../etc", ROOT / "default" / "sessions" / path_component("../../etc")),
        ("session", "default", "a/b", ROOT / "default" / "sessions" / path_component("a/b")),
    ],
)
def test_workspace_path_derivation(scope: str, tenant: str, session: str | None, expected: Path) -> None:
    policy = loads(f"version: 1\nworkspace: {{scope: {scope}, mount: /work, size: 512MiB}}\n")
    r = resolve(policy, ExecRequest(command="x"), tenant, workspace_root=ROOT, session_id=session)
    assert r.workspace is not None and r.workspace_path == expected
    assert r.workspace.size_mb == 512 and r.workspace.scope == scope
    (mount,) = r.options.extra_mounts
    assert (mount.destination, mount.source, mount.type, mount.read_only) == ("/work", str(expected), "bind", False)
    assert r.options.workdir == "/work"
    assert ROOT in expected.parents


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "-rf", ".hidden", "x" * 65, "é", "a\x00b", "@abc"])
def test_path_component_is_one_safe_name(name: str) -> None:
    out = path_component(name)
    assert "/" not in out and out not in (".", "..", "") and not out.startswith("-") and "\x00" not in out
    assert out.startswith("@") and len(out) == 33


def test_path_component_keeps_readable_names_and_never_collides() -> None:
    assert path_component("alice") == "alice"
    assert path_component("ci-bot_2.x") == "ci-bot_2.x"
    assert path_component("a/b") != path_component("a_b")


def test_workspace_needs_root_and_session() -> None:
    with pytest.raises(ValueError, match="workspace_root"):
        resolve(load_default(), ExecRequest(command="x"), "default", workspace_root=None, session_id="s")
    with pytest.raises(ValueError, match="absolute"):
        resolve(load_default(), ExecRequest(command="x"), "default", workspace_root=Path("rel"), session_id="s")


def test_no_session_means_no_workspace_never_a_shared_one() -> None:
    """Sessionless HTTP (2026-07-28) under scope session: no workspace, said in a note."""
    r = resolve(load_default(), ExecRequest(command="x"), "default", workspace_root=ROOT, session_id=None)
    assert r.workspace is None and r.options.extra_mounts == () and r.options.workdir == "/tmp"
    assert r.receipt.get("workspace").granted is None
    assert any("create_workspace" in n for n in r.receipt.notes)
    # Scope tenant has no such problem: the tenant's one workspace.
    policy = loads("version: 1\nworkspace: {scope: tenant}\n")
    r = resolve(policy, ExecRequest(command="x"), "default", workspace_root=ROOT, session_id=None)
    assert r.workspace_path == ROOT / "default" / "shared" and not r.receipt.notes


def test_named_workspace_is_kept_and_separate_from_sessions() -> None:
    r = resolve(
        load_default(),
        ExecRequest(command="x"),
        "default",
        workspace_root=ROOT,
        session_id="s",
        workspace_name="default",
    )
    assert r.workspace_path == ROOT / "default" / "named" / "default"
    assert r.workspace.kept and r.workspace.name == "default"
    r = resolve(
        load_default(), ExecRequest(command="x"), "default", workspace_root=ROOT, session_id="s", workspace_name="../x"
    )
    assert r.workspace_path == ROOT / "default" / "named" / path_component("../x")
    assert not resolve(
        load_default(), ExecRequest(command="x"), "default", workspace_root=ROOT, session_id="s"
    ).workspace.kept


def test_projects_are_mounted_and_listed_in_the_receipt(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    policy = loads(
        f"version: 1\nprojects:\n  app: {{path: {tmp_path / 'app'}, mount: /project, read_only: false}}\n"
        f"  docs: {{path: {tmp_path}}}\n"
    )
    r = resolve(policy, ExecRequest(command="x"), "default", workspace_root=ROOT, session_id="s")
    by_dest = {m.destination: m for m in r.options.extra_mounts}
    assert by_dest["/project"].source == str(tmp_path / "app") and not by_dest["/project"].read_only
    assert by_dest["/projects/docs"].read_only and by_dest["/workspace"].source.startswith(str(ROOT))
    mounts = r.receipt.get("mounts").granted
    assert [(m["name"], m["mount"], m["access"]) for m in mounts] == [
        ("workspace", "/workspace", "read-write"),
        ("app", "/project", "read-write"),
        ("docs", "/projects/docs", "read-only"),
    ]
    # Host paths come from the operator only; the receipt shows names and mount points.
    assert str(tmp_path) not in str(mounts)


def test_command_and_stdin() -> None:
    r = run(load_default(), command="cd /tmp && ls -l | wc -l", stdin="data")
    assert r.options.command == ("/bin/sh", "-c", "cd /tmp && ls -l | wc -l")
    assert r.options.stdin == b"data"
    assert denied(load_default(), command="echo \x00").field == "command"
    assert denied(load_default(), command="x" * (2 * 1024 * 1024)).field == "command"


def test_request_cannot_carry_identity_or_paths() -> None:
    for extra in ({"tenant": "admin"}, {"session_id": "x"}, {"rootfs": "/"}, {"extra_mounts": []}, {"user": "0:0"}):
        with pytest.raises(ValueError):
            ExecRequest(command="x", **extra)


def test_strict_policy() -> None:
    policy = load(REPO / "policies" / "strict.yaml")
    r = run(policy)
    assert r.options.extra_mounts == () and r.options.workdir == "/tmp"
    assert r.options.env == {"LANG": "C.UTF-8", "TZ": "UTC"}
    assert denied(policy, env={"PATH": "/evil"}).field == "env.PATH"
    assert denied(policy, timeout_seconds=120).field == "timeout_seconds"


def test_receipt_is_json_and_summarises() -> None:
    import json

    r = run(CLAMP, memory_mb=9999, env={"A": "1"})
    data = json.loads(r.receipt.model_dump_json())
    assert data["tenant"] == "default" and data["policy_sha256"] == CLAMP.sha256
    fields = [e["field"] for e in data["entries"]]
    assert fields == [
        "timeout_seconds",
        "cpus",
        "memory_mb",
        "max_pids",
        "max_output_bytes",
        "network",
        "image",
        "workdir",
        "env",
        "user",
        "workspace",
        "mounts",
    ]
    assert "memory_mb=2048 (clamped to ceiling)" in r.receipt.summary()
    assert data["notes"] == ["memory_mb: asked 9999 MiB, granted 2048 MiB (clamped to the ceiling)"]


def test_resolution_is_a_snapshot() -> None:
    """A run keeps the settings it was admitted under, whatever is loaded later."""
    first = loads("version: 1\ndefaults: {memory: 256MiB}\n")
    r = run(first)
    loads("version: 1\ndefaults: {memory: 1GiB}\n")
    assert r.settings.defaults.memory == 256 and r.options.resources.memory_mb == 256
