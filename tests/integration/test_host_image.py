"""The built-in `host` image is a normal Debian userland for what the host
has installed, and still holds none of the host's secrets.

Each everyday command is checked only when the host has it (under the
sandbox's PATH): the image promises "what the host has", not more.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gvisor_mcp.sandbox import ContainerOptions, ContainerStatus, UserSpec
from gvisor_mcp.sandbox.rootfs import ETC_FILES
from gvisor_mcp.sandbox.spec import DEFAULT_ENV

pytestmark = pytest.mark.runsc

SANDBOX_PATH = DEFAULT_ENV["PATH"]

# (program, script run inside in /tmp, what its stdout must contain)
EVERYDAY: list[tuple[str, str, str]] = [
    ("awk", "echo 'a b c' | awk '{print $2}'", "b\n"),
    ("sed", "echo hello | sed s/l/L/g", "heLLo\n"),
    ("grep", "printf 'x\\ny\\n' | grep -c y", "1\n"),
    ("which", "which sh", "/sh\n"),
    ("find", "mkdir -p d/e && touch d/e/f && find d -type f", "d/e/f\n"),
    ("xargs", "printf '1 2 3' | xargs -n1 echo | wc -l", "3\n"),
    ("tar", "echo t > t && tar cf t.tar t && tar tf t.tar", "t\n"),
    ("gzip", "echo zz > z && gzip z && gzip -dc z.gz", "zz\n"),
    ("python3", "python3 -c 'import json, ssl, sqlite3; print(json.dumps([1]))'", "[1]\n"),
    (
        "cc",
        "printf '#include <stdio.h>\\nint main(void){puts(\"built\");return 0;}\\n' > h.c && cc -o h h.c && ./h",
        "built\n",
    ),
    ("make", "printf 'all:\\n\\t@echo made\\n' > Makefile && make", "made\n"),
    (
        "git",
        "git init -q r && cd r && git -c user.name=a -c user.email=a@b commit -q --allow-empty -m m"
        " && git log --format=%s",
        "m\n",
    ),
    ("curl", "echo local > f && curl -s file:///tmp/f", "local\n"),
    ("jq", "echo '{\"a\": 7}' | jq .a", "7\n"),
    ("node", "node -e 'console.log(6*7)'", "42\n"),
    ("vi", "vi --version | head -1", "VIM"),
    ("editor", 'command -v editor && test -x "$(readlink -f "$(command -v editor)")" && echo ok', "ok\n"),
]


def host_has(program: str) -> bool:
    return shutil.which(program, path=SANDBOX_PATH) is not None


def sh(script: str, **kw) -> ContainerOptions:
    return ContainerOptions(command=["/bin/sh", "-c", script], user=UserSpec(uid=1000, gid=1000), workdir="/tmp", **kw)


async def test_everyday_commands_the_host_has_run_inside(manager):
    present = [e for e in EVERYDAY if host_has(e[0])]
    # Debian's essentials are always there; the rest only where installed.
    assert {"awk", "sed", "grep", "find", "xargs", "tar", "gzip"} <= {e[0] for e in present}
    failures = []
    for program, script, expected in present:
        r = await manager.run(sh(script))
        out = r.stdout.decode(errors="replace")
        if r.status is not ContainerStatus.EXITED or r.exit_code != 0 or expected not in out:
            failures.append(
                f"{program}: exit {r.exit_code} {r.status.value} stdout={out!r} "
                f"stderr={r.stderr.decode(errors='replace')[:300]!r}"
            )
    assert not failures, "\n".join(failures)


async def test_alternatives_certificates_loader_os_and_locale_data(manager):
    script = r"""
readlink /usr/bin/awk; test -e /etc/alternatives/awk && echo alt-ok
test -s /etc/ssl/certs/ca-certificates.crt && echo ca-ok
python3 -c 'import ssl; print("x509_ca", ssl.create_default_context().cert_store_stats()["x509_ca"] > 0)'
test -s /etc/ld.so.cache && echo ldcache-ok
. /etc/os-release && echo "os $ID"
test -e /etc/localtime && date +%Z >/dev/null && echo tz-ok
test -d /usr/share/zoneinfo && TZ=Europe/Paris date +%Z
LC_ALL=C.UTF-8 python3 -c 'print("\u00e9")'
getent services ssh | cut -c1-3
"""
    if not host_has("python3"):
        pytest.skip("the host has no python3")
    r = await manager.run(sh(script))
    out = r.stdout.decode()
    assert r.exit_code == 0, r.stderr
    assert "alt-ok" in out and "ca-ok" in out and "x509_ca True" in out and "ldcache-ok" in out
    assert "os debian" in out and "tz-ok" in out
    assert "CET" in out or "CEST" in out
    assert "é\n" in out
    if Path("/etc/services").exists():
        assert "ssh\n" in out


async def test_none_of_the_hosts_secrets_and_nothing_writable_reaches_the_host(manager, sandbox_base):
    r = await manager.run(
        ContainerOptions(
            command=[
                "/bin/sh",
                "-c",
                r"""
for p in /etc/shadow /etc/gshadow /etc/ssh /etc/ssl/private /etc/sudoers /etc/pip.conf /etc/npmrc \
         /etc/gitconfig /etc/environment /etc/machine-id /etc/apt /root/.bashrc /home/* /var/lib /var/log; do
  test -e "$p" && echo "PRESENT $p"
done
ls -A /home /root 2>/dev/null
ls -A /var; ls -A /var/tmp
echo x > /etc/passwd 2>/dev/null || echo etc-ro
mkdir /etc/new 2>/dev/null || echo etc-ro2
echo x > /usr/local/gvisor-mcp-probe 2>/dev/null || echo usr-ro
echo x > /var/tmp/scratch && echo var-tmp-ok
echo x > /newfile && echo root-mem-ok
id -u
""",
            ]
        )
    )  # root inside: the strongest reader
    out = r.stdout.decode()
    assert "PRESENT" not in out, out
    assert out.splitlines()[:1] == ["tmp"], out  # /var holds only tmp, which is empty
    for word in ("etc-ro\n", "etc-ro2\n", "usr-ro\n", "var-tmp-ok\n", "root-mem-ok\n"):
        assert word in out, out
    assert out.endswith("0\n")
    assert not Path("/usr/local/gvisor-mcp-probe").exists()
    # The /etc copy on the host is untouched and holds only allowlisted or generated names.
    etc = (sandbox_base / "bundles" / ".image" / "etc").resolve()
    assert (etc / "passwd").read_text() == ETC_FILES["passwd"]
    assert not (etc / "new").exists()
