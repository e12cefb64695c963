"""The built-in image's /etc: an allowlisted copy of the host's, plus generated files."""

from __future__ import annotations

import os

from gvisor_mcp.sandbox.rootfs import ETC_FILES, etc_entries, write_etc


def test_the_etc_copy_is_an_allowlist_of_public_files(tmp_path):
    """A fake host /etc with secrets next to what programs need."""
    host = tmp_path / "etc"
    (host / "ssl" / "certs").mkdir(parents=True)
    (host / "ssl" / "private").mkdir()
    (host / "ssl" / "private" / "key.pem").write_text("SECRET")
    (host / "ssl" / "certs" / "ca-certificates.crt").write_text("CERTS")
    os.symlink("/usr/share/ca-certificates/x.crt", host / "ssl" / "certs" / "abcd.0")
    (host / "alternatives").mkdir()
    os.symlink("/usr/bin/mawk", host / "alternatives" / "awk")
    (host / "shadow").write_text("root:$6$hash")
    (host / "passwd").write_text("root:x:0:0::/root:/bin/bash\nalice:x:1001:1001::/home/alice:/bin/bash\n")
    (host / "ld.so.cache").write_bytes(b"\x00cache")
    (host / "python3.11").mkdir()
    (host / "python3.11" / "sitecustomize.py").write_text("pass\n")
    (host / "python3.11" / "private.conf").write_text("token")
    os.chmod(host / "python3.11" / "private.conf", 0o600)
    (host / "pip.conf").write_text("[global]\nindex-url = https://user:pass@example/simple\n")
    entries = {rel: (kind, data) for rel, kind, _mode, data in etc_entries(host)}
    assert entries["ssl/certs/ca-certificates.crt"] == ("f", b"CERTS")
    assert entries["ssl/certs/abcd.0"] == ("l", b"/usr/share/ca-certificates/x.crt")
    assert entries["alternatives/awk"] == ("l", b"/usr/bin/mawk")
    assert entries["ld.so.cache"] == ("f", b"\x00cache")
    assert entries["python3.11/sitecustomize.py"][0] == "f"
    assert entries["passwd"] == ("f", ETC_FILES["passwd"].encode())  # generated, not the host's
    for secret in ("shadow", "ssl/private", "ssl/private/key.pem", "pip.conf", "python3.11/private.conf"):
        assert secret not in entries


def test_write_etc_is_content_addressed_and_never_changes_a_finished_copy(tmp_path):
    host = tmp_path / "etc"
    host.mkdir()
    (host / "services").write_text("ssh 22/tcp\n")
    link = tmp_path / "image" / "etc"
    first = write_etc(link, host)
    assert link.resolve() == first and (first / "services").read_text() == "ssh 22/tcp\n"
    assert write_etc(link, host) == first  # same content: same directory
    (host / "services").write_text("ssh 22/tcp\nhttp 80/tcp\n")
    second = write_etc(link, host)
    assert second != first and link.resolve() == second
    assert (first / "services").read_text() == "ssh 22/tcp\n"  # runs using it see no change
    assert sorted(p.name for p in link.parent.iterdir() if p.name.startswith(".")) == []
