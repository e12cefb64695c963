"""Loading policy files: every refusal names the file, the line, the key path and what is expected."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from gvisor_mcp.policy import (
    Policy,
    PolicyError,
    Settings,
    UnknownTenant,
    default_policy_text,
    load,
    load_default,
    loads,
)
from gvisor_mcp.policy.source import MAX_FILE_BYTES, _Builder, _PolicyLoader

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def refusal(tmp_path: Path, text: str) -> tuple[Path, PolicyError]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as e:
        load(path)
    return path, e.value


# (yaml, line, key path, fragment of the message)
CASES = [
    pytest.param(
        "version: 1\nbogus: 1\n",
        2,
        "bogus",
        "unknown key 'bogus'; expected one of: defaults, ceilings",
        id="unknown-top-key",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  memroy: 1GiB\n",
        3,
        "defaults.memroy",
        "expected one of: network, cpus, memory",
        id="unknown-nested-key",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    defaults:\n      cpu: 1\n",
        5,
        "tenants.a.defaults.cpu",
        "unknown key 'cpu'",
        id="unknown-tenant-key",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  cpus: 1\n  cpus: 2\n",
        4,
        "defaults.cpus",
        "duplicate key (first written on line 3)",
        id="duplicate-key",
    ),
    pytest.param("version: 1\nversion: 1\n", 2, "version", "duplicate key", id="duplicate-top-key"),
    pytest.param(
        'version: 1\ndefaults:\n  cpus: "2"\n',
        3,
        "defaults.cpus",
        "got str '2'; expected a number of CPU cores",
        id="cpus-string",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  max_pids: 1.5\n", 3, "defaults.max_pids", "expected a whole number", id="pids-float"
    ),
    pytest.param(
        "version: 1\ndefaults:\n  max_pids: 2\n",
        3,
        "defaults.max_pids",
        "out of range; expected a whole number from 4",
        id="pids-too-low",
    ),
    pytest.param(
        "version: 1\nworkspace:\n  enabled: yes\n",
        3,
        "workspace.enabled",
        "got str 'yes'; expected true or false",
        id="yaml11-bool",
    ),
    pytest.param(
        "version: 1\ndefaults: 5\n", 2, "defaults", "got int 5; expected a mapping of keys", id="section-not-mapping"
    ),
    pytest.param(
        "version: 1\nnetwork:\n  allowed: none\n", 3, "network.allowed", "expected a list", id="list-as-string"
    ),
    pytest.param(
        "version: 1\nnetwork:\n  allowed: []\n", 3, "network.allowed", "the list is empty", id="empty-allowed"
    ),
    pytest.param(
        "version: 1\nnetwork:\n  allowed: [none, wifi]\n",
        3,
        "network.allowed[1]",
        "'wifi' is not allowed; expected one of 'none', 'sandbox' or 'host'",
        id="bad-network",
    ),
    pytest.param(
        "version: 1\nnetwork:\n  allowed: [none, none]\n", 3, "network.allowed", "listed twice", id="network-twice"
    ),
    pytest.param(
        "version: 1\nenv:\n  set:\n    DEBUG: 1\n",
        4,
        "env.set.DEBUG",
        "expected a string (quote it)",
        id="env-value-int",
    ),
    pytest.param("version: 1\nenv:\n  set:\n    1BAD: x\n", 4, "env.set.1BAD", "not a variable name", id="env-key-bad"),
    pytest.param('version: 1\nenv:\n  allow: ["A B"]\n', 3, "env.allow[0]", "not a key pattern", id="env-pattern-bad"),
    pytest.param(
        "version: 1\ndefaults:\n  memory: 512MB\n",
        3,
        "defaults.memory",
        "ambiguous unit 'MB'; expected binary units, e.g. 512MiB",
        id="unit-ambiguous",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  memory: 8MiB\n",
        3,
        "defaults.memory",
        "out of range; expected a memory size from 16MiB",
        id="memory-too-small",
    ),
    pytest.param(
        "version: 1\nceilings:\n  timeout: 5 minutes\n",
        3,
        "ceilings.timeout",
        "not a duration; expected a duration like 30s",
        id="duration-bad",
    ),
    pytest.param("version: 1\ndefaults:\n  user: root\n", 3, "defaults.user", "expected UID:GID", id="user-bad"),
    pytest.param(
        "version: 1\ndefaults:\n  workdir: tmp\n", 3, "defaults.workdir", "not absolute", id="workdir-relative"
    ),
    pytest.param(
        "version: 1\nworkspace:\n  mount: /proc/x\n",
        3,
        "workspace.mount",
        "cannot be a mount point",
        id="workspace-proc",
    ),
    pytest.param(
        "version: 1\nworkspace:\n  scope: global\n",
        3,
        "workspace.scope",
        "expected one of 'session' or 'tenant'",
        id="workspace-scope",
    ),
    pytest.param(
        "version: 1\non_exceed: maybe\n", 2, "on_exceed", "expected one of 'reject' or 'clamp'", id="on-exceed"
    ),
    pytest.param(
        "version: 1\nimages:\n  catalog:\n    host: /srv\n",
        4,
        "images.catalog.host",
        "built-in image and cannot be redefined",
        id="catalog-host",
    ),
    pytest.param(
        'version: 1\ntenants:\n  "bad name": {}\n', 3, "tenants.bad name", "not a valid name", id="tenant-name"
    ),
    pytest.param(
        "defaults: {}\n", 1, "version", "required key is missing; expected `version: 1`", id="missing-version"
    ),
    pytest.param("version: 2\n", 1, "version", "2 is not allowed; expected one of 1", id="wrong-version"),
    # cross-key checks
    pytest.param(
        "version: 1\ndefaults:\n  memory: 4GiB\n",
        3,
        "defaults.memory",
        "defaults.memory 4GiB is above ceilings.memory 2GiB",
        id="default-above-ceiling",
    ),
    pytest.param(
        "version: 1\nceilings:\n  timeout: 1m\n",
        3,
        "ceilings.timeout",
        "defaults.timeout 2m is above ceilings.timeout 1m",
        id="ceiling-below-default",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    defaults:\n      cpus: 2\n    ceilings:\n      cpus: 1.5\n",
        5,
        "tenants.a.defaults.cpus",
        "above ceilings.cpus 1.5 CPUs (tenant 'a')",
        id="tenant-default-above-ceiling",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    ceilings: {timeout: 1m}\n",
        4,
        "tenants.a.ceilings.timeout",
        "defaults.timeout 2m is above ceilings.timeout 1m (tenant 'a')",
        id="tenant-ceiling-below-inherited-default",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  network: host\n",
        3,
        "defaults.network",
        "'host' is not in network.allowed ['none']",
        id="default-network-not-allowed",
    ),
    pytest.param(
        "version: 1\ndefaults:\n  image: py\n",
        3,
        "defaults.image",
        "'py' is not in images.allowed",
        id="default-image-not-allowed",
    ),
    pytest.param(
        "version: 1\nimages:\n  allowed: [host, py]\n",
        3,
        "images.allowed[1]",
        "image 'py' is not in images.catalog",
        id="allowed-image-not-in-catalog",
    ),
    pytest.param(
        "version: 1\nimages:\n  catalog:\n    py: /nonexistent/rootfs\n",
        4,
        "images.catalog.py",
        "/nonexistent/rootfs does not exist",
        id="image-path-missing",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    extends: nobody\n",
        4,
        "tenants.a.extends",
        "tenant 'nobody' is not defined",
        id="unknown-tenant-referenced",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    extends: b\n  b:\n    extends: a\n",
        6,
        "tenants.b.extends",
        "cycle (a -> b -> a)",
        id="extends-cycle",
    ),
    pytest.param("version: 1\ntenants:\n  a:\n    extends: a\n", 4, "tenants.a.extends", "cycle", id="extends-self"),
    pytest.param(
        "version: 1\ntenants:\n  default: {}\n",
        3,
        "tenants.default",
        "name of the top level's own tenant",
        id="tenant-named-default",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    ceilings:\n      memory: 8GiB\n",
        5,
        "tenants.a.ceilings.memory",
        "above the top-level ceiling 2GiB; expected at most 2GiB, or `allow_above_ceilings: true` in tenants.a",
        id="tenant-above-ceiling",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    network:\n      allowed: [none, host]\n",
        5,
        "tenants.a.network.allowed",
        "network mode(s) host (tenant 'a') are not allowed at the top level",
        id="tenant-network-above",
    ),
    pytest.param(
        "version: 1\ntenants:\n  a:\n    allow_above_ceilings: true\n    ceilings:\n      memory: 8GiB\n  b:\n    extends: a\n",
        8,
        "tenants.b.extends",
        "ceilings.memory 8GiB (tenant 'b') is above the top-level ceiling",
        id="flag-not-inherited",
    ),
    pytest.param(
        "version: 1\nenv:\n  max_vars: 1024\n  set:\n    A: b\n",
        4,
        "env.set",
        "can exceed the sandbox's limit",
        id="env-over-sandbox-limit",
    ),
    # files and projects
    pytest.param(
        "version: 1\nfiles:\n  max_write: 512\n",
        3,
        "files.max_write",
        "out of range; expected a size from 1KiB",
        id="files-max-write-low",
    ),
    pytest.param(
        "version: 1\nfiles:\n  max_read: 1GiB\n", 3, "files.max_read", "out of range", id="files-max-read-high"
    ),
    pytest.param("version: 1\nfiles:\n  max_list: 0\n", 3, "files.max_list", "out of range", id="files-max-list"),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: relative/dir}\n",
        3,
        "projects.app.path",
        "not absolute",
        id="project-relative",
    ),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: /}\n", 3, "projects.app.path", "cannot be a project", id="project-root"
    ),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: /proc/1}\n",
        3,
        "projects.app.path",
        "cannot be a project",
        id="project-proc",
    ),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: /tmp, mount: /dev/x}\n",
        3,
        "projects.app.mount",
        "cannot be a mount point",
        id="project-mount-dev",
    ),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: /nonexistent/app}\n",
        3,
        "projects.app.path",
        "/nonexistent/app does not exist",
        id="project-missing",
    ),
    pytest.param(
        "version: 1\nprojects:\n  app: {path: /tmp, mount: /workspace/app}\n",
        2,
        "projects",
        "the workspace (/workspace) and project 'app' (/workspace/app) overlap",
        id="project-in-workspace",
    ),
    pytest.param(
        "version: 1\nprojects:\n  a: {path: /tmp, mount: /p}\n  b: {path: /tmp, mount: /p}\n",
        2,
        "projects",
        "overlap",
        id="projects-same-mount",
    ),
    pytest.param(
        "version: 1\nprojects:\n  a: {path: /tmp, writable: true}\n",
        3,
        "projects.a.writable",
        "unknown key",
        id="project-unknown-key",
    ),
    # YAML-level refusals
    pytest.param(
        "version: 1\nbase: &b {cpus: 1}\ndefaults: *b\n", 3, "(file)", "aliases (*name) are not allowed", id="alias"
    ),
    pytest.param("version: 1\ndefaults: [\n", 3, "(file)", "YAML syntax", id="syntax"),
    pytest.param("", 1, "(file)", "the file is empty", id="empty"),
    pytest.param("- version: 1\n", 1, "(file)", "the document is a list; expected a mapping", id="list-document"),
    pytest.param("version: 1\n1: x\n", 2, "1", "key '1' is not a string", id="non-string-key"),
    pytest.param(
        "version: 1\ndefaults: !!python/object:os.system {}\n",
        2,
        "defaults",
        "YAML tag 'tag:yaml.org,2002:python/object:os.system' is not supported",
        id="python-tag",
    ),
    pytest.param("version: 1\ndefaults:\n  cpus: !!binary aGk=\n", 3, "defaults.cpus", "YAML tag", id="binary-tag"),
]


@pytest.mark.parametrize(("text", "line", "key", "fragment"), CASES)
def test_load_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int, key: str, fragment: str) -> None:
    path, error = refusal(tmp_path, text)
    lines = [str(p) for p in error.problems]
    prefix = f"{path}:{line}: {key}: "
    matching = [s for s in lines if s.startswith(prefix)]
    assert matching, f"no problem starting with {prefix!r} in {lines}"
    assert any(fragment in s for s in matching), lines
    assert all("; expected " in s for s in lines), lines
    assert str(error).startswith("invalid policy (")


def test_every_problem_is_listed(tmp_path: Path) -> None:
    _, error = refusal(
        tmp_path,
        """\
        version: 1
        defaults:
          memory: 512MB
          cpus: "2"
        on_exceed: maybe
        """,
    )
    assert [p.path for p in error.problems] == ["defaults.memory", "defaults.cpus", "on_exceed"]
    assert [p.line for p in error.problems] == [3, 4, 5]


def test_alias_bomb_is_refused_at_the_first_alias_without_expanding(tmp_path: Path, monkeypatch) -> None:
    """10**30 strings if aliases were followed. The bound is on work, not time:
    the loader composes fewer nodes than the file spells out (it stops at the
    first alias, line 3), where following aliases would compose 10**30."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 30):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = write(tmp_path, "version: 1\n" + "\n".join(levels) + "\n")
    written = 2 + 2 * 30 + 10 + 29 * 10  # keys, values and list items in the text
    steps = 0

    def counted(original):  # type: ignore[no-untyped-def]
        def step(*args):  # type: ignore[no-untyped-def]
            nonlocal steps
            steps += 1
            assert steps <= 2 * written, "more nodes visited than the file holds: aliases followed"
            return original(*args)

        return step

    # Composing the node tree and building data from it: where expansion would happen.
    monkeypatch.setattr(_PolicyLoader, "compose_node", counted(_PolicyLoader.compose_node))
    monkeypatch.setattr(_Builder, "build", counted(_Builder.build))
    with pytest.raises(PolicyError, match="aliases") as e:
        load(path)
    assert [p.line for p in e.value.problems] == [3]
    assert 0 < steps <= written, steps


def test_merge_key_is_not_special(tmp_path: Path) -> None:
    _, error = refusal(tmp_path, "version: 1\ndefaults:\n  <<: {cpus: 1}\n")
    assert "unknown key '<<'" in str(error)


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(PolicyError, match="bytes; expected at most"):
        load(path)


@pytest.mark.slow
def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match="nest"):
        load(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\n# \xff\n")
    with pytest.raises(PolicyError, match=r":2: \(file\): not valid UTF-8"):
        load(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the file"):
        load(tmp_path / "missing.yaml")


def test_yaml_1_1_surprises_stay_strings() -> None:
    policy = loads("version: 1\ndefaults:\n  user: 1000:1000\n")
    assert policy.tenant("default").defaults.user == "1000:1000"
    with pytest.raises(PolicyError, match="expected a whole number"):
        loads("version: 1\nquotas:\n  max_concurrent: 010\n")


def test_image_paths_checked_only_when_asked(tmp_path: Path) -> None:
    text = "version: 1\nimages:\n  catalog:\n    py: /nonexistent/rootfs\n  allowed: [host, py]\n"
    policy = loads(text, check_paths=False)
    assert policy.tenant("default").images.catalog["py"].path == "/nonexistent/rootfs"
    assert policy.file.model_dump(mode="json")["images"]["catalog"] == {"py": "/nonexistent/rootfs"}
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    ok = loads(text.replace("/nonexistent/rootfs", str(rootfs)))
    assert ok.tenant("default").images.allowed == ("host", "py")


def test_human_units_are_parsed() -> None:
    policy = loads(
        """\
version: 1
defaults: {cpus: 1.5, memory: 1GiB, timeout: 90s, max_output: 1MiB}
ceilings: {cpus: 2, memory: 2GiB, timeout: 1h, max_output: 8MiB}
output: {head: 2KiB, tail: 512}
foreground_limit: 1m
"""
    )
    s = policy.tenant("default")
    assert (s.defaults.cpus, s.defaults.memory, s.defaults.timeout, s.defaults.max_output) == (
        1.5,
        1024,
        90.0,
        1024 * 1024,
    )
    assert (s.ceilings.timeout, s.output.head, s.output.tail, s.foreground_limit) == (3600.0, 2048, 512, 60.0)


def test_tenant_inheritance() -> None:
    policy = loads(
        """\
version: 1
on_exceed: clamp
env: {set: {LANG: C.UTF-8}, allow: ["A_*"]}
tenants:
  a:
    defaults: {memory: 1GiB}
    env: {set: {CI: "1"}}
  b:
    extends: a
    env: {allow: ["B_*"]}
    quotas: {max_concurrent: 1}
  c:
    allow_above_ceilings: true
    ceilings: {memory: 4GiB}
    network: {allowed: [none, host]}
"""
    )
    top, a, b, c = (policy.tenant(n) for n in ("default", "a", "b", "c"))
    assert policy.tenant_names == ("default", "a", "b", "c")
    assert (top.defaults.memory, a.defaults.memory, b.defaults.memory) == (512, 1024, 1024)
    assert a.on_exceed == b.on_exceed == "clamp"
    assert a.env.set == {"LANG": "C.UTF-8", "CI": "1"} == b.env.set  # mappings merge
    assert (a.env.allow, b.env.allow) == (("A_*",), ("B_*",))  # lists replace
    assert (a.quotas.max_concurrent, b.quotas.max_concurrent) == (4, 1)
    assert c.ceilings.memory == 4096 and c.ceilings.cpus == top.ceilings.cpus
    assert c.network.allowed == ("none", "host")
    assert b.name == "b"


def test_unknown_tenant_fails_closed() -> None:
    with pytest.raises(UnknownTenant, match="'nobody' is not defined in the policy; defined tenants: default"):
        load_default().tenant("nobody")


def test_load_returns_a_new_policy_or_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ndefaults: {memory: 256MiB}\n")
    first = load(path)
    path.write_text("version: 1\ndefaults: {memory: lots}\n")
    with pytest.raises(PolicyError):
        load(path)
    assert first.tenant("default").defaults.memory == 256  # the old snapshot is untouched
    path.write_text("version: 1\ndefaults: {memory: 1GiB}\n")
    second = load(path)
    assert second is not first and second.sha256 != first.sha256
    assert second.tenant("default").defaults.memory == 1024


def test_hash_is_of_the_exact_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\n")
    policy = load(path)
    assert policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == policy.sha256
    assert policy.source == str(path)


def test_default_policy_is_embedded_and_matches_the_repo_copy() -> None:
    assert default_policy_text() == (REPO / "policies" / "default.yaml").read_bytes()
    policy = load_default()
    assert isinstance(policy, Policy)
    assert policy.sha256 == hashlib.sha256(default_policy_text()).hexdigest()


def test_default_policy_values() -> None:
    s = load_default().tenant("default")
    assert s.defaults.network == "none" and s.network.allowed == ("none",)
    assert (s.defaults.cpus, s.defaults.memory, s.defaults.max_pids, s.defaults.timeout) == (1.0, 512, 256, 120.0)
    assert s.workspace.enabled and s.workspace.scope == "session"
    assert s.defaults.user == "1000:1000"
    assert (s.output.head, s.output.tail, s.foreground_limit) == (4096, 4096, 45.0)


def test_omitted_keys_equal_the_default_policy() -> None:
    """The model's field defaults are the baseline; default.yaml spells them out."""
    written = load_default().tenant("default").model_dump(exclude={"name"})
    assert written == Settings().model_dump()
    assert loads("version: 1\n").tenant("default").model_dump() == load_default().tenant("default").model_dump()


@pytest.mark.parametrize("path", sorted((REPO / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    assert load(path).tenant("default")
