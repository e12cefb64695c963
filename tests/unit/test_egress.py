"""Egress rules, the address guard, and network.egress in policy files."""

from __future__ import annotations

import io
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gvisor_mcp.network.accounting import MAX_DESTINATIONS, ConnectionEvent, RunAccounting
from gvisor_mcp.network.egress import EgressError, EgressRules, ip_literal, parse_rule
from gvisor_mcp.network.guard import classify
from gvisor_mcp.policy import ExecRequest, PolicyDenied, PolicyError, loads, resolve
from gvisor_mcp.policy.cli import policy_main


def ip(a: str):
    return ipaddress.ip_address(a)


@pytest.mark.parametrize(
    "text, host, port, ok",
    [
        ("pypi.org", "pypi.org", 443, True),
        ("pypi.org", "PyPI.org.", 80, True),
        ("pypi.org", "pypi.org", 22, False),
        ("pypi.org", "evil-pypi.org", 443, False),
        ("pypi.org", "pypi.org.evil.example", 443, False),
        ("*.pythonhosted.org", "files.pythonhosted.org", 443, True),
        ("*.pythonhosted.org", "a.b.pythonhosted.org", 443, True),
        ("*.pythonhosted.org", "pythonhosted.org", 443, False),
        ("*.pythonhosted.org", "evilpythonhosted.org", 443, False),
        ("mirror.test:8080", "mirror.test", 8080, True),
        ("mirror.test:8080", "mirror.test", 80, False),
        ("*", "anything.example", 443, True),
    ],
)
def test_domain_rules(text, host, port, ok):
    assert parse_rule(text).matches_name(host, port) is ok


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a b.org",
        "a.*.org",
        "*pypi.org",
        "-a.org",
        "pypi.org:0",
        "pypi.org:x",
        "10.0.0.1/8",
        "10.0.0.1",
        "::1",
        {"domain": "a.org", "cidr": "10.0.0.0/8"},
        {"ports": [80]},
        {"domain": "a.org", "ports": []},
        {"domain": "a.org", "ports": [80, 80]},
        42,
    ],
)
def test_malformed_rules_say_what_is_expected(bad):
    with pytest.raises(EgressError, match="expected"):
        parse_rule(bad)


def test_cidr_rules_and_literals():
    r = parse_rule({"cidr": "10.1.0.0/16", "ports": [3128]})
    assert r.matches_address(ip("10.1.2.3"), 3128) and not r.matches_address(ip("10.1.2.3"), 80)
    assert not r.matches_address(ip("::ffff:10.1.2.3"), 3128)  # v6 spelling is not the v4 rule
    assert parse_rule("10.1.0.0/16:3128") == r
    assert parse_rule("fd00::/8:443").ports == (443,)
    for spelling in ("127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::1]", "::ffff:127.0.0.1"):
        assert ip_literal(spelling) is not None, spelling
    assert ip_literal("pypi.org") is None and ip_literal("1.example") is None


def test_narrowing_never_widens():
    rules = EgressRules(allow=["pypi.org", "*.pythonhosted.org", {"cidr": "10.0.0.0/8", "ports": [3128]}])
    assert [str(r) for r in rules.narrowed(["files.pythonhosted.org", "pypi.org:443"]).allow] == [
        "files.pythonhosted.org",
        "pypi.org ports [443]",
    ]
    assert rules.narrowed(["10.1.0.0/16"]).allow[0].ports == (3128,)  # the allowlist's ports
    for wider in ["*", "evil.example", "pypi.org:22", "*.org", "pythonhosted.org", "10.0.0.0/7", "10.0.0.0/8:80"]:
        with pytest.raises(EgressError, match="not within the egress allowlist"):
            rules.narrowed([wider])
    assert rules.narrowed(["*.a.pythonhosted.org"]).allows_name("x.a.pythonhosted.org", 443)


@pytest.mark.slow
@given(st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True), st.integers(1, 65535))
def test_a_narrowed_list_allows_nothing_the_original_does_not(name, port):
    rules = EgressRules(allow=["*.example.org", "pypi.org"])
    for req in (["*.example.org"], ["a.example.org:443"], ["pypi.org"]):
        if rules.narrowed(req).allows_name(name, port):
            assert rules.allows_name(name, port)


@pytest.mark.parametrize(
    "addr, why",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.2.3.4", "RFC 1918"),
        ("172.16.0.1", "RFC 1918"),
        ("192.168.1.1", "RFC 1918"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "metadata"),
        ("fd12::1", "unique-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("2002:7f00:1::", "loopback"),
        ("0.0.0.0", "unicast"),
        ("224.0.0.1", "unicast"),
        ("100.64.0.1", "non-public"),
        ("198.18.0.1", "non-public"),
        ("100.100.100.200", "metadata"),
    ],
)
def test_guard_refuses_internal_addresses(addr, why):
    assert why in classify(ip(addr))


def test_guard_accepts_public_and_refuses_the_hosts_own():
    assert classify(ip("93.184.215.14")) is None and classify(ip("2606:4700::1")) is None
    assert "own" in classify(ip("93.184.215.14"), frozenset({ip("93.184.215.14")}))


def test_accounting_is_bounded():
    acc = RunAccounting(proxy="p")
    for i in range(MAX_DESTINATIONS + 50):
        acc.add(ConnectionEvent("r", f"h{i}.example:443", "denied", "not in the egress allowlist", "CONNECT"))
    rep = acc.report()
    assert len(rep["destinations"]) == MAX_DESTINATIONS
    assert rep["connections"] == MAX_DESTINATIONS + 50 and rep["other_connections"] == 50


# --- policy files --------------------------------------------------------------

POLICY = """version: 1
workspace: {enabled: false}
network:
  allowed: [none, sandbox]
  egress:
    allow:
      - pypi.org
      - "*.pythonhosted.org"
      - {cidr: 10.20.0.0/16, ports: [3128]}
    hosts: {mirror.internal: 10.20.0.5}
    max_bytes: 100MiB
tenants:
  narrow:
    network:
      egress:
        allow: [pypi.org]
  wide:
    network:
      egress:
        allow: [evil.example]
"""


def test_policy_egress_inherits_key_by_key_and_bounds_tenants():
    with pytest.raises(PolicyError) as e:
        loads(POLICY)
    (p,) = e.value.problems
    assert p.line == 20 and p.path == "tenants.wide.network.egress.allow" and "evil.example" in p.message
    policy = loads(POLICY.replace("        allow: [evil.example]", "        max_connections: 8"))
    narrow = policy.tenant("narrow").network.egress
    assert [str(r) for r in narrow.allow] == ["pypi.org"]
    assert narrow.max_bytes == 100 * 1024 * 1024 and narrow.hosts  # inherited
    wide = policy.tenant("wide").network.egress
    assert wide.max_connections == 8 and len(wide.allow) == 3


def test_policy_check_refuses_bad_rules_with_their_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnetwork:\n  egress:\n    allow:\n      - pypi.org\n      - 10.0.0.1/8\n")
    out, err = io.StringIO(), io.StringIO()
    assert policy_main(["check", str(bad)], stdout=out, stderr=err) == 1
    assert f"{bad}:6: network.egress.allow[1]" in err.getvalue() and "host bits set" in err.getvalue()


def test_policy_check_warns_about_host_and_wide_cidrs(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\nnetwork:\n  allowed: [none, host, sandbox]\n  egress:\n    allow: [0.0.0.0/0]\n")
    out, err = io.StringIO(), io.StringIO()
    assert policy_main(["check", str(f)], stdout=out, stderr=err) == 0
    text = err.getvalue()
    assert f"{f}:3: network.allowed[1]: warning: 'host'" in text and "bypasses network.egress" in text
    assert f"{f}:5: network.egress.allow[0]: warning: cidr 0.0.0.0/0 includes 127.0.0.1" in text


def test_requests_narrow_and_are_refused_when_wider():
    policy = loads(POLICY.replace("        allow: [evil.example]", "        max_connections: 8"))
    r = resolve(
        policy,
        ExecRequest(command="true", network="sandbox", egress=["pypi.org:443"]),
        "default",
        workspace_root=None,
        session_id="s",
    )
    assert [str(x) for x in r.options.egress.allow] == ["pypi.org ports [443]"]
    assert r.options.egress.max_bytes == 100 * 1024 * 1024
    full = resolve(
        policy, ExecRequest(command="true", network="sandbox"), "default", workspace_root=None, session_id="s"
    )
    assert len(full.options.egress.allow) == 3
    with pytest.raises(PolicyDenied) as e:
        resolve(
            policy,
            ExecRequest(command="true", network="sandbox", egress=["evil.example"]),
            "default",
            workspace_root=None,
            session_id="s",
        )
    assert "pypi.org, *.pythonhosted.org" in str(e.value) and "Ask again" in str(e.value)
    with pytest.raises(PolicyDenied, match="only with network 'sandbox'"):
        resolve(
            policy, ExecRequest(command="true", egress=["pypi.org"]), "default", workspace_root=None, session_id="s"
        )
    none = resolve(policy, ExecRequest(command="true"), "default", workspace_root=None, session_id="s")
    assert none.options.egress is None
