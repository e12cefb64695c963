"""Load a policy file, or refuse it with every problem located.

`load(path)` either returns a complete, checked `Policy` or raises
`PolicyError`; it never returns something half-valid. That is what makes
SIGHUP reload safe: the server calls `load()` and keeps its old policy when
it raises. A `Policy` is immutable, so runs already admitted keep the
snapshot they were admitted under.
"""

from __future__ import annotations

import hashlib
import ipaddress
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..images.store import ImageStore
from .effective import build_tenants
from .errors import PolicyError, Problem, UnknownTenant
from .images import check_store_images
from .model import DEFAULT_TENANT, PolicyFile, Settings, TenantSettings
from .source import KeyPath, Source, format_path, parse

DEFAULT_POLICY_NAME = "<built-in default policy>"


@dataclass(frozen=True)
class Policy:
    """A loaded policy: the validated file, each tenant's effective settings, and its identity.

    `sha256` is the hash of the file's exact bytes; it goes into every limits
    receipt so a result can be traced to the policy that allowed it.
    """

    file: PolicyFile
    source: str
    sha256: str
    tenants: Mapping[str, TenantSettings] = field(repr=False)
    warnings: tuple[Problem, ...] = ()
    """Valid but risky choices (`host` networking, wide CIDRs): `policy check`
    prints them, `serve` logs them; they never refuse the file."""

    @property
    def label(self) -> str:
        """How results name the policy, with `sha256`: the file's name without
        its directory (clients never see a host path), or the built-in's name."""
        if self.source == DEFAULT_POLICY_NAME:
            return self.source
        return Path(self.source).name or "<policy>"

    @property
    def tenant_names(self) -> tuple[str, ...]:
        return tuple(self.tenants)

    def tenant(self, name: str) -> TenantSettings:
        """The effective settings of tenant `name`; raises UnknownTenant (fail closed)."""
        try:
            return self.tenants[name]
        except KeyError:
            raise UnknownTenant(name, self.tenant_names) from None


def loads(
    text: str | bytes, file: str = "<string>", *, check_paths: bool = True, images: ImageStore | None = None
) -> Policy:
    """Parse and check a policy from memory; `file` is only used in messages.

    `check_paths=False` skips the host filesystem checks (image directories
    must exist), for checking a file meant for another machine. With
    `images` (the server's image store), every store image the catalog
    names must be in it.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    source, problems = parse(raw, file)
    if problems:
        raise PolicyError(problems)
    if not isinstance(source.data, dict):
        raise PolicyError(
            [
                Problem(
                    file,
                    1,
                    "",
                    f"the document is a {type(source.data).__name__}",
                    "a mapping of keys, starting with `version: 1`",
                )
            ]
        )
    try:
        policy_file = PolicyFile.model_validate(source.data)
    except ValidationError as e:
        raise PolicyError(_problems_from_pydantic(e, source)) from None
    tenants, issues = build_tenants(policy_file, check_paths=check_paths)
    if check_paths and images is not None and not issues:
        issues = check_store_images(policy_file, tenants, images)
    if issues:
        raise PolicyError(
            [
                Problem(file, source.line_of(path), format_path(path), message, expected)
                for path, message, expected in issues
            ]
        )
    ordered = {DEFAULT_TENANT: tenants[DEFAULT_TENANT]}
    ordered.update((n, tenants[n]) for n in policy_file.tenants)
    return Policy(
        file=policy_file,
        source=file,
        sha256=hashlib.sha256(raw).hexdigest(),
        tenants=types.MappingProxyType(ordered),
        warnings=tuple(
            Problem(file, source.line_of(path), format_path(path), message, expected)
            for path, message, expected in risky_choices(policy_file)
        ),
    )


_SENSITIVE = tuple(
    ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "169.254.169.254", "fd00:ec2::254", "10.0.0.1", "192.168.0.1")
)


def risky_choices(file: PolicyFile) -> list[tuple[KeyPath, str, str]]:
    """What `policy check` warns about, per section where it is written."""
    out: list[tuple[KeyPath, str, str]] = []
    sections: list[tuple[KeyPath, Settings]] = [((), file)]
    sections += [(("tenants", n), t) for n, t in file.tenants.items()]
    for base, sec in sections:
        net = sec.network
        if "network" not in sec.model_fields_set:
            continue
        if "host" in net.allowed and "allowed" in net.model_fields_set:
            out.append(
                (
                    (*base, "network", "allowed", net.allowed.index("host")),
                    "warning: 'host' gives sandboxes the host's whole network (private addresses, the "
                    "cloud metadata endpoint, services listening on the host) and bypasses network.egress",
                    "'sandbox' with a network.egress allowlist, unless every user of this policy is trusted",
                )
            )
        egress = net.egress
        for i, rule in enumerate(egress.allow if "egress" in net.model_fields_set else ()):
            if rule.cidr is None:
                continue
            hit = [str(a) for a in _SENSITIVE if a.version == rule.cidr.version and a in rule.cidr]
            if hit:
                out.append(
                    (
                        (*base, "network", "egress", "allow", i),
                        f"warning: cidr {rule.cidr} includes {', '.join(hit)} (loopback, metadata or private "
                        "ranges): sandboxes can reach such addresses through the proxy",
                        "the narrowest CIDR of the internal service you mean",
                    )
                )
        if "egress" in net.model_fields_set and egress.allow and "sandbox" not in net.allowed:
            out.append(
                (
                    (*base, "network", "egress"),
                    "warning: network.egress has no effect here: 'sandbox' is not in network.allowed",
                    "'sandbox' in network.allowed, or no egress section",
                )
            )
    return out


def load(path: str | Path, *, check_paths: bool = True, images: ImageStore | None = None) -> Policy:
    """Load the policy file at `path`; raises PolicyError (also for an unreadable file)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(
            [Problem(name, 1, "", f"cannot read the file: {e.strerror or e}", "a readable policy file")]
        ) from None
    return loads(raw, name, check_paths=check_paths, images=images)


def default_policy_text() -> bytes:
    """The embedded default policy's bytes (same as policies/default.yaml)."""
    return resources.files("gvisor_mcp").joinpath("policies", "default.yaml").read_bytes()


@lru_cache(maxsize=1)
def load_default() -> Policy:
    """The built-in policy used when no file is given (immutable, so cached)."""
    return loads(default_policy_text(), DEFAULT_POLICY_NAME)


# --- pydantic errors -> located problems ------------------------------------


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional down to the type that holds keys."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(path: KeyPath) -> Any:
    """The schema type at `path` (a model class, a dict type, ...), or None."""
    tp: Any = PolicyFile
    for part in path:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        else:
            return None
    return _unwrap(tp)


def _keys_expected(path: KeyPath) -> str:
    tp = _type_at(path)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "one of: " + ", ".join(tp.model_fields)
    return "no such key here"


_TYPE_WORDS = {
    "dict_type": "a mapping of keys",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "tuple_type": "a list",
    "list_type": "a list",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string (quote it)",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
}


def _problems_from_pydantic(error: ValidationError, source: Source) -> list[Problem]:
    problems = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        is_key = bool(loc) and loc[-1] == "[key]"
        path: KeyPath = tuple(p for p in loc if p != "[key]")
        kind = err["type"]
        given = err.get("input")
        if kind == "extra_forbidden":
            message = f"unknown key {str(path[-1])!r}"
            expected = _keys_expected(path[:-1])
        elif kind == "missing":
            message = "required key is missing"
            expected = "`version: 1`" if path == ("version",) else "this key to be written"
        elif kind == "value_error":
            text = str(err["ctx"]["error"])
            message, _, expected = text.partition("; expected ")
            if is_key:
                message = f"key {message}"
        elif kind == "literal_error":
            message = f"{_short(given)} is not allowed"
            expected = "one of " + str(err["ctx"]["expected"])
        elif kind == "too_short":
            message = "the list is empty"
            expected = "at least one item"
        elif kind in _TYPE_WORDS:
            message = f"got {type(given).__name__} {_short(given)}"
            expected = _TYPE_WORDS[kind]
        else:
            message = f"{err['msg']} (got {_short(given)})"
            expected = "the type described in docs/policy.md"
        problems.append(Problem(source.file, source.line_of(path), format_path(path), message, expected))
    return problems
