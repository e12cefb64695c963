"""The HTTP tokens file: parsing, lookup, adding, and the SIGHUP reload."""

from __future__ import annotations

import hashlib

import pytest

from gvisor_mcp.tokens import METRICS_ROLE, TOKEN_PREFIX, TokenFile, TokenFileError


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_add_stores_only_a_hash_and_lookup_finds_the_tenant(tmp_path):
    path = tmp_path / "sub" / "tokens.yaml"
    tokens = TokenFile.load(path)  # a missing file: no tokens yet
    assert tokens.entries == () and tokens.tenant_for("anything") is None
    alice = tokens.add("alice")
    metrics = tokens.add(METRICS_ROLE)
    assert alice.startswith(TOKEN_PREFIX) and len(alice) > 40 and alice != metrics
    stored = path.read_text()
    assert alice not in stored and sha(alice) in stored and stored.startswith("# gvisor-mcp tokens")
    assert path.stat().st_mode & 0o777 == 0o600
    again = TokenFile.load(path)
    assert again.tenant_for(alice) == "alice" and again.tenant_for(metrics) == METRICS_ROLE
    for wrong in (None, "", alice + "x", alice[:-1], sha(alice)):
        assert again.tenant_for(wrong) is None


def test_hashes_are_matched_case_insensitively(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - {{sha256: {sha('gmcp_t').upper()}, tenant: bob}}\n")
    assert TokenFile.load(path).tenant_for("gmcp_t") == "bob"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("tokens: [", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with a `tokens:` list"),
        ("tokens: {alice: x}\n", "expected a mapping with a `tokens:` list"),
        ("tokens:\n  - {sha256: abc, tenant: alice}\n", "tokens[0] must have `sha256` (64 hex digits)"),
        ("tokens:\n  - {sha256: %s}\n" % ("a" * 64), "tokens[0] must have `sha256` (64 hex digits) and `tenant`"),
        ("tokens:\n  - {sha256: %s, tenant: a}\n  - just a string\n" % ("a" * 64), "tokens[1]"),
    ],
)
def test_bad_files_are_refused_naming_the_file_and_the_entry(tmp_path, body, expected):
    path = tmp_path / "tokens.yaml"
    path.write_text(body)
    with pytest.raises(TokenFileError) as e:
        TokenFile.load(path)
    assert str(e.value).startswith(str(path)) and expected in str(e.value)


def test_reload_takes_a_good_file_and_keeps_the_old_tokens_when_the_new_one_is_broken(tmp_path):
    path = tmp_path / "tokens.yaml"
    tokens = TokenFile.load(path)
    alice = tokens.add("alice")
    serving = TokenFile.load(path)
    bob = TokenFile.load(path).add("bob")  # `gvisor-mcp token add bob` while serving
    assert serving.tenant_for(bob) is None
    serving = serving.reload()
    assert serving.tenant_for(bob) == "bob" and serving.tenant_for(alice) == "alice"
    path.write_text("tokens: [broken")
    kept = serving.reload()
    assert kept is serving and kept.tenant_for(bob) == "bob"
    path.write_bytes(b"tokens:\n  - \xff\xfe\n")  # not UTF-8
    assert serving.reload() is serving
    path.unlink()
    path.mkdir()  # unreadable as a file
    assert serving.reload() is serving
    path.rmdir()
    assert serving.reload().entries == ()  # removed: no tokens (every request gets 401)
