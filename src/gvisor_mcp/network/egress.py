"""The egress allowlist: which destinations a run's proxy may connect to.

Nothing is allowed unless a rule says so. A rule is a domain pattern or a
CIDR, each with ports (default 80 and 443):

- `pypi.org` matches that name only; `*.pythonhosted.org` matches any name
  *below* it (`files.pythonhosted.org`, `a.b.pythonhosted.org`), not
  `pythonhosted.org` itself; `*` matches any name. Names are compared
  lower-case, without a trailing dot; internationalised names are written in
  their `xn--` form.
- `10.1.2.0/24` (or an IPv6 prefix) allows IP-literal destinations inside it,
  AND is the only way a *name* may lead to a non-public address (loopback,
  RFC 1918, link-local, metadata, unique-local, this host's own): an
  internal mirror needs its CIDR written out.

Written in a policy as strings (`pypi.org`, `pypi.org:8080`, `10.0.0.0/8`)
or mappings (`{domain: pypi.org, ports: [443]}`, `{cidr: 10.0.0.0/8,
ports: [3128]}`). A request may narrow the allowlist (ask for a subset),
never widen it: see `EgressRules.narrowed`.

This module knows nothing of policy files or the sandbox: the policy layer
builds `EgressRules`, the proxy enforces them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigurationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS: tuple[int, ...] = (80, 443)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
RULE_EXPECTED = (
    "a domain like pypi.org or *.pythonhosted.org (optionally :PORT), '*', "
    "a CIDR like 10.0.0.0/8, or a mapping {domain: ..., ports: [...]} / {cidr: ..., ports: [...]}"
)


class EgressError(ConfigurationError, ValueError):
    """A malformed rule, host or request; the text ends with '; expected ...'.

    In a policy file it is the operator's; in a request, resolve() turns it
    into a PolicyDenied for the agent."""


def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _check_domain(pattern: str) -> str:
    p = normalize_host(pattern)
    if p == "*":
        return p
    body = p[2:] if p.startswith("*.") else p
    if not body or len(body) > 253 or "*" in body:
        raise EgressError(f"{pattern!r} is not a domain pattern; expected {RULE_EXPECTED}")
    labels = body.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise EgressError(f"{pattern!r} is not a domain pattern; expected {RULE_EXPECTED}")
    if ip_literal(body) is not None:
        raise EgressError(
            f"{pattern!r} is an IP address, not a domain; expected a CIDR such as {body}/32 for an address"
        )
    return p


def ip_literal(host: str) -> IPAddress | None:
    """The address when `host` is an IP literal in any spelling getaddrinfo
    would accept (`[::1]`, `127.1`, `0x7f000001`, `2130706433`), else None.

    Legacy numeric IPv4 forms count as literals so that no spelling of an
    address can pass for a name.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0] if ":" in h else h  # a zone id is never useful to us
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def _ports(value: Any) -> tuple[int, ...]:
    if value is None:
        return DEFAULT_PORTS
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise EgressError(f"ports {value!r} is not a list of ports; expected a list like [80, 443]")
    out = []
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise EgressError(f"port {p!r} is not a port; expected whole numbers from 1 to 65535")
        if p in out:
            raise EgressError(f"port {p} is listed twice; expected each port at most once")
        out.append(p)
    return tuple(out)


class EgressRule(BaseModel):
    """One allowlist entry: a domain pattern or a CIDR, and its ports."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str | None = None
    cidr: IPNetwork | None = None
    ports: tuple[int, ...] = DEFAULT_PORTS

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return None if v is None else _check_domain(v)

    @field_validator("cidr", mode="before")
    @classmethod
    def _cidr(cls, v: Any) -> Any:
        if v is None or isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return v
        try:
            return ipaddress.ip_network(str(v), strict=True)
        except ValueError as e:
            raise EgressError(f"{v!r} is not a CIDR ({e}); expected a network like 10.0.0.0/8 or fd00::/8") from None

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, v: Any) -> Any:
        return _ports(v)

    @model_validator(mode="after")
    def _one(self) -> EgressRule:
        if (self.domain is None) == (self.cidr is None):
            raise EgressError(f"a rule needs exactly one of domain or cidr; expected {RULE_EXPECTED}")
        return self

    def __str__(self) -> str:
        what = self.domain if self.domain is not None else str(self.cidr)
        return what if self.ports == DEFAULT_PORTS else f"{what} ports {list(self.ports)}"

    def matches_name(self, host: str, port: int) -> bool:
        if self.domain is None or port not in self.ports:
            return False
        return domain_matches(self.domain, host)

    def matches_address(self, ip: IPAddress, port: int) -> bool:
        return self.cidr is not None and port in self.ports and ip.version == self.cidr.version and ip in self.cidr

    def covers(self, other: EgressRule) -> bool:
        """Everything `other` allows, this allows too."""
        if not set(other.ports) <= set(self.ports):
            return False
        if other.domain is not None:
            return self.domain is not None and pattern_covers(self.domain, other.domain)
        assert other.cidr is not None
        return (
            self.cidr is not None and other.cidr.version == self.cidr.version and other.cidr.subnet_of(self.cidr)  # type: ignore[arg-type]  # same IP version (line above); mypy cannot narrow the pair
        )


def domain_matches(pattern: str, host: str) -> bool:
    host = normalize_host(host)
    if pattern == "*":
        return bool(host)
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def pattern_covers(outer: str, inner: str) -> bool:
    """Every name `inner` matches, `outer` matches too."""
    if outer == "*":
        return True
    if inner == "*":
        return False
    if inner.startswith("*."):
        return outer.startswith("*.") and (inner == outer or inner.endswith(outer[1:]))
    return domain_matches(outer, inner)


def _build(**fields: Any) -> EgressRule:
    """EgressRule(**fields), its validation errors as one EgressError."""
    try:
        return EgressRule.model_validate(fields)
    except EgressError:
        raise
    except ValueError as e:  # pydantic's ValidationError: keep its first message
        errs = getattr(e, "errors", None)
        if not callable(errs):
            raise EgressError(f"{fields!r} is not a rule; expected {RULE_EXPECTED}") from None
        first = errs(include_url=False)[0]
        msg = str(first.get("ctx", {}).get("error") or first["msg"])
        if "; expected" not in msg:
            where = ".".join(str(p) for p in first["loc"])
            msg = f"{where + ': ' if where else ''}{msg}; expected {RULE_EXPECTED}"
        raise EgressError(msg) from None


def parse_rule(value: Any) -> EgressRule:
    """A rule as written in a policy or a request: a string or a mapping."""
    if isinstance(value, EgressRule):
        return value
    if isinstance(value, dict):
        return _build(**value)
    if not isinstance(value, str) or not value.strip():
        raise EgressError(f"{value!r} is not a rule; expected {RULE_EXPECTED}")
    text = value.strip()
    if "/" in text:
        net, _, rest = text.partition("/")
        if ":" in rest:  # 10.0.0.0/8:3128
            prefix, _, port = rest.partition(":")
            if not port.isdigit():
                raise EgressError(f"{text!r} has a bad port; expected CIDR or CIDR:PORT (1-65535)")
            return _build(cidr=f"{net}/{prefix}", ports=(int(port),))
        return _build(cidr=text)
    if ip_literal(text) is not None:
        raise EgressError(f"{text!r} is an address, not a rule; expected a CIDR such as {text}/32")
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return _build(domain=host, ports=(int(port),))
    if sep:
        raise EgressError(f"{text!r} has a bad port; expected DOMAIN or DOMAIN:PORT (1-65535)")
    return _build(domain=text)


def _host_map(value: Any) -> dict[str, tuple[IPAddress, ...]]:
    if not isinstance(value, dict):
        raise EgressError(f"{value!r} is not a mapping; expected NAME: ADDRESS (or a list of addresses)")
    out: dict[str, tuple[IPAddress, ...]] = {}
    for name, addrs in value.items():
        if not isinstance(name, str):
            raise EgressError(f"{name!r} is not a host name; expected a name like mirror.internal")
        key = _check_domain(name)
        if key.startswith("*"):
            raise EgressError(f"{name!r} is a pattern; expected one host name per entry")
        items = addrs if isinstance(addrs, (list, tuple)) else [addrs]
        parsed = []
        for a in items:
            try:
                parsed.append(ipaddress.ip_address(str(a)))
            except ValueError:
                raise EgressError(
                    f"{a!r} (for {name}) is not an IP address; expected an address like 10.0.0.5"
                ) from None
        if not parsed:
            raise EgressError(f"{name!r} has no address; expected at least one")
        out[key] = tuple(parsed)
    return out


class EgressRules(BaseModel):
    """What one run's proxy enforces: the allowlist, static names, limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: tuple[EgressRule, ...] = ()
    hosts: dict[str, tuple[IPAddress, ...]] = Field(default_factory=dict)
    """Names the proxy resolves itself, before (and instead of) DNS."""
    max_connections: int = Field(default=32, ge=1, le=4096)
    """Connections open at once."""
    max_bytes: int = Field(default=1 << 30, ge=1)
    """Bytes both ways, over the whole run."""
    idle_timeout: float = Field(default=60.0, gt=0)
    """Seconds a connection may pass no byte either way before it is closed."""

    @field_validator("allow", mode="before")
    @classmethod
    def _allow(cls, v: Any) -> Any:
        if v is None:
            return ()
        return tuple(parse_rule(x) for x in v)

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        return {} if v is None else _host_map(v)

    def allows_name(self, host: str, port: int) -> bool:
        return any(r.matches_name(host, port) for r in self.allow)

    def allows_address(self, ip: IPAddress, port: int) -> bool:
        return any(r.matches_address(ip, port) for r in self.allow)

    def describe(self, limit: int = 12) -> str:
        if not self.allow:
            return "nothing (no egress rule)"
        shown = [str(r) for r in self.allow[:limit]]
        more = len(self.allow) - limit
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")

    def narrowed(self, requested: list[Any] | tuple[Any, ...]) -> EgressRules:
        """The same limits with only `requested` allowed; each requested rule
        must be covered by one of ours (a request never widens the list).

        A requested string without a port (`pypi.org`, `10.0.0.0/8`) means
        "with the ports the allowlist gives it"; with one (`pypi.org:443`)
        that port must be allowed. Raises EgressError naming the first rule
        that is not covered.
        """
        rules = []
        for item in requested:
            rule = parse_rule(item)
            explicit = not isinstance(item, str) or _has_port(item)
            if not explicit:
                ports = sorted(
                    {
                        p
                        for mine in self.allow
                        if mine.covers(rule.model_copy(update={"ports": mine.ports}))
                        for p in mine.ports
                    }
                )
                if ports:
                    rule = rule.model_copy(update={"ports": tuple(ports)})
            if not any(mine.covers(rule) for mine in self.allow):
                raise EgressError(f"{item!r} is not within the egress allowlist ({self.describe()})")
            rules.append(rule)
        return self.model_copy(update={"allow": tuple(rules)})


def _has_port(text: str) -> bool:
    """`host:443` or `10.0.0.0/8:443` (an IPv6 CIDR's colons come before the '/')."""
    tail = text.strip().rpartition("/")[2] if "/" in text else text.strip()
    return ":" in tail
