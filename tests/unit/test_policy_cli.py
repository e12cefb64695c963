"""`gvisor-mcp policy check | show | schema` as functions (policy_main)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gvisor_mcp.policy import load, loads
from gvisor_mcp.policy.cli import policy_main

from ..images_helpers import store_with

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "policies").glob("*.yaml"))


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = policy_main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.runsc  # root: the image store's unpack gives files their owners
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_pass_check(path: Path, tmp_path: Path) -> None:
    """Against a state directory whose image store has the images they name."""
    store_with(tmp_path / "images", "agent")
    code, out, err = cli("check", str(path), "--state-dir", str(tmp_path))
    assert (code, err) == (0, "")
    assert out.startswith(f"{path}: ok (tenants: default")


def test_a_shipped_policy_whose_image_is_not_built_says_how_to_build_it(tmp_path: Path) -> None:
    code, out, err = cli("check", str(REPO / "policies" / "agent.yaml"), "--state-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert "images.catalog.agent: image 'agent' is not in the image store" in err
    assert "gvisor-mcp image build agent" in err


def test_shipped_policies_include_the_three_examples() -> None:
    assert {p.name for p in SHIPPED} >= {"default.yaml", "strict.yaml", "multi-tenant.yaml"}


def test_check_prints_every_problem_to_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefaults:\n  memory: 512MB\non_exceed: maybe\n")
    code, out, err = cli("check", str(bad), str(REPO / "policies" / "default.yaml"))
    assert code == 1
    assert f"{bad}:3: defaults.memory: " in err and f"{bad}:4: on_exceed: " in err
    assert "ok" in out  # the good file is still reported


def test_check_without_path_checks(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\nimages:\n  catalog: {py: /nonexistent}\n")
    assert cli("check", str(f))[0] == 1
    assert cli("check", "--no-path-checks", str(f))[0] == 0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_show_prints_a_loadable_effective_policy(path: Path) -> None:
    policy = load(path)
    for tenant in policy.tenant_names:
        code, out, err = cli("show", "--policy", str(path), "--tenant", tenant)
        assert (code, err) == (0, "")
        assert f"tenant {tenant!r}" in out and policy.sha256 in out
        again = loads(out, "shown.yaml").tenant("default")
        assert again.model_dump(exclude={"name"}) == policy.tenant(tenant).model_dump(exclude={"name"})


def test_show_defaults_to_builtin_policy() -> None:
    code, out, _ = cli("show")
    assert code == 0 and "<built-in default policy>" in out and "memory: 512MiB" in out


def test_show_unknown_tenant() -> None:
    code, out, err = cli("show", "--tenant", "nobody")
    assert code == 1 and out == "" and "'nobody' is not defined" in err


def test_show_invalid_policy(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\nbogus: 1\n")
    code, _, err = cli("show", "--policy", str(f))
    assert code == 1 and f"{f}:2: bogus: unknown key" in err


def test_schema_is_json_schema_of_the_file() -> None:
    code, out, _ = cli("schema")
    assert code == 0
    doc = json.loads(out)
    assert doc["$schema"].startswith("https://json-schema.org/")
    assert {
        "version",
        "defaults",
        "ceilings",
        "network",
        "on_exceed",
        "images",
        "workspace",
        "env",
        "output",
        "quotas",
        "foreground_limit",
        "tenants",
    } <= set(doc["properties"])
    assert doc["required"] == ["version"]
    assert doc["additionalProperties"] is False


def test_usage_errors_exit_2() -> None:
    assert cli()[0] == 2
    assert cli("frobnicate")[0] == 2


# --- fair share: quotas against the server's capacity ------------------------------------------

QUOTAS = """version: 1
quotas: {max_concurrent: 2}
tenants:
  a: {quotas: {max_concurrent: %d}}
  b: {}
"""


@pytest.mark.parametrize("a, warned", [(5, False), (6, True)])
def test_check_warns_when_the_quotas_add_up_to_more_than_the_capacity(tmp_path: Path, a: int, warned: bool) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(QUOTAS % a)
    code, out, err = cli("check", str(path), "--max-concurrent", "9")  # 2 + a + 2: 9 fits, 10 does not
    assert code == 0 and out.startswith(f"{path}: ok")
    assert (
        "add up to 10 (default=2, a=6, b=2), more than the server's capacity (--max-concurrent 9)" in err
    ) == warned, err
    assert "is at least the server's capacity" not in err


@pytest.mark.parametrize("a, warned", [(7, False), (8, True)])
def test_check_warns_when_one_tenant_can_hold_every_slot(tmp_path: Path, a: int, warned: bool) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(QUOTAS % a)
    code, _, err = cli("check", str(path), "--max-concurrent", "8")
    assert code == 0
    line = f"tenant 'a': quotas.max_concurrent={a} is at least the server's capacity (--max-concurrent 8)"
    assert (line in err) == warned, err
    assert "'b'" not in err.split("add up")[0]


def test_a_stdio_server_warns_only_about_a_quota_above_its_capacity() -> None:
    policy = loads(QUOTAS % 8, "p.yaml")
    from gvisor_mcp.policy.fairness import capacity_warnings

    assert capacity_warnings(policy, 8, ["a"], shared=False) == []
    assert capacity_warnings(policy, 8, ["b"], shared=False) == []
    (w,) = capacity_warnings(policy, 7, ["a"], shared=False)
    assert "at most 7 of its runs go at once" in w
    assert len(capacity_warnings(policy, 8)) == 2  # shared (HTTP): a reaches 8, and 12 > 8
