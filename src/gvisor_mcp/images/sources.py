"""The host's apt sources and settings, for mmdebstrap.

`image build` installs packages from the same Debian repositories the
machine itself uses (its /etc/apt/sources.list and sources.list.d), with
the same keyrings and the same Acquire settings (proxies, validity checks):
no mirror is ever written in this project. Only the stanzas for the
requested suite (and its -updates and -security suites) are used, so a
third-party repository for another distribution never ends up in an image.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ImageError

APT_DIR = Path("/etc/apt")
PASSED_OPTIONS = re.compile(
    r"^Acquire::(Check-Valid-Until|Check-Date|Retries|ForceIPv4|ForceIPv6|"
    r"(http|https|ftp)::(Proxy|proxy)(::.*)?)$"
)
"""Host apt settings that decide how this machine reaches its repositories."""


@dataclass
class Stanza:
    uris: list[str]
    suites: list[str]
    components: list[str]
    options: dict[str, str] = field(default_factory=dict)
    """Signed-By, Architectures, Trusted (deb822 names)."""


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        text = os_release.read_text()
    except OSError:
        text = ""
    m = re.search(r'^VERSION_CODENAME="?([a-z]+)"?$', text, re.M)
    if not m:
        raise ImageError("cannot tell this host's Debian release from /etc/os-release; pass --suite")
    return m.group(1)


def _deb822(text: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                out.append(fields)
            fields, key = {}, None
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line
            continue
        k, sep, v = line.partition(":")
        if sep:
            key = k.strip().lower()
            fields[key] = v.strip()
    return out


_ONE_LINE_OPTIONS = {"signed-by": "Signed-By", "arch": "Architectures", "trusted": "Trusted"}


def _one_line(text: str) -> list[Stanza]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            inner, _, rest = rest[1:].partition("]")
            for opt in inner.split():
                k, _, v = opt.partition("=")
                if k in _ONE_LINE_OPTIONS:
                    options[_ONE_LINE_OPTIONS[k]] = v.replace(",", " ")
        parts = rest.split()
        if len(parts) >= 2:
            out.append(Stanza(uris=[parts[0]], suites=[parts[1]], components=parts[2:], options=options))
    return out


def host_stanzas(apt_dir: Path = APT_DIR) -> list[Stanza]:
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    out: list[Stanza] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.name.endswith(".sources"):
            for f in _deb822(text):
                if "deb" not in f.get("types", "").split() or f.get("enabled", "yes").lower() == "no":
                    continue
                options = {}
                for key, name in (
                    ("signed-by", "Signed-By"),
                    ("architectures", "Architectures"),
                    ("trusted", "Trusted"),
                ):
                    if key in f:
                        options[name] = f[key]
                out.append(
                    Stanza(
                        f.get("uris", "").split(), f.get("suites", "").split(), f.get("components", "").split(), options
                    )
                )
        elif path.name.endswith(".list"):
            out.extend(_one_line(text))
    return out


def sources_for(suite: str, apt_dir: Path = APT_DIR) -> tuple[str, list[str]]:
    """(deb822 text, URIs) of the host's sources for `suite`, `suite-updates`
    and `suite-security`; ImageError when the host has none."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    blocks, uris = [], []
    for s in host_stanzas(apt_dir):
        suites = [x for x in s.suites if x in wanted]
        if not suites or not s.uris:
            continue
        lines = [
            "Types: deb",
            f"URIs: {' '.join(s.uris)}",
            f"Suites: {' '.join(suites)}",
            f"Components: {' '.join(s.components or ['main'])}",
        ]
        lines += [f"{k}: {v}" for k, v in s.options.items()]
        blocks.append("\n".join(lines))
        uris += [u for u in s.uris if u not in uris]
    if not blocks:
        raise ImageError(
            f"this host has no apt source for suite {suite!r} in {apt_dir}/sources.list or "
            f"{apt_dir}/sources.list.d/: add one (the image is built from the host's own "
            "repositories), or pass --suite with a suite the host has"
        )
    return "\n\n".join(blocks) + "\n", uris


def apt_options() -> list[str]:
    """`Key "value";` lines of the host's apt settings that mmdebstrap must share."""
    if shutil.which("apt-config") is None:
        return []
    r = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False)
    out = []
    for line in r.stdout.splitlines():
        key, _, value = line.partition(" ")
        if PASSED_OPTIONS.match(key) and value.startswith('"') and value.endswith('";'):
            out.append(f"{key} {value[:-1]}")
    return out
