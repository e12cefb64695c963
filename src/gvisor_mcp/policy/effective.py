"""Tenant inheritance, and the checks that need more than one key at a time.

Each tenant starts from its parent (the top level, or the tenant named in
`extends`) and overrides only the keys it writes. Mappings listed in
model.MERGED_MAPPINGS (`env.set`, `images.catalog`) are extended key by key;
every other value, lists included, is replaced.

Ceilings are the operator's promise: a tenant whose effective ceilings (or
network modes) go beyond the TOP-LEVEL ones is an error unless that tenant's
own section says `allow_above_ceilings: true`. The flag is deliberately not
inherited through `extends`, so raising a limit is always written next to
the tenant that gets it.

Issues come back as (key path, message, expected); loader.py turns them
into located Problems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..sandbox.options import MAX_ENV, MAX_ENV_BYTES
from .model import (
    BUILTIN_IMAGE,
    DEFAULT_TENANT,
    MERGED_MAPPINGS,
    PolicyFile,
    Settings,
    TenantSection,
    TenantSettings,
    _Section,
)
from .source import KeyPath
from .units import format_bytes, format_duration, format_mib

Issue = tuple[KeyPath, str, str]
Origins = dict[tuple[str, ...], KeyPath]
"""(section, key) or (key,) -> where in the file the effective value was written."""

RESOURCES = ("cpus", "memory", "max_pids", "timeout", "max_output")


def show(key: str, value: Any) -> str:
    """A resource value in the units the file uses."""
    if key == "memory":
        return format_mib(value)
    if key == "timeout":
        return format_duration(value)
    if key == "max_output":
        return format_bytes(value)
    if key == "cpus":
        return f"{value:g} CPUs"
    return str(value)


def _written(settings: Settings, base: KeyPath) -> Origins:
    """Where each key written in `settings` lives, for the keys actually written
    (nested sections, like network.egress, down to their own keys)."""
    out: Origins = {}

    def walk(section: _Section, key: tuple[str, ...]) -> None:
        for name in section.model_fields_set:
            value = getattr(section, name)
            out[(*key, name)] = (*base, *key, name)
            if isinstance(value, _Section):
                walk(value, (*key, name))

    for name in settings.model_fields_set & set(Settings.model_fields):
        value = getattr(settings, name)
        if isinstance(value, _Section):
            walk(value, (name,))
        else:
            out[(name,)] = (*base, name)
    return out


def _merge(parent: _Section, child: _Section, path: tuple[str, ...]) -> _Section:
    """`parent` with the keys written in `child` on top, section by section."""
    update: dict[str, Any] = {}
    for key in child.model_fields_set:
        new = getattr(child, key)
        old = getattr(parent, key)
        if (*path, key) in MERGED_MAPPINGS:
            new = {**old, **new}
        elif isinstance(new, _Section) and isinstance(old, _Section):
            new = _merge(old, new, (*path, key))
        update[key] = new
    return parent.model_copy(update=update)


def _overlay(parent: Settings, section: Settings) -> dict[str, Any]:
    """The parent's fields with `section`'s written keys on top."""
    fields: dict[str, Any] = {name: getattr(parent, name) for name in Settings.model_fields}
    for name in section.model_fields_set & set(Settings.model_fields):
        value = getattr(section, name)
        if isinstance(value, _Section):
            fields[name] = _merge(fields[name], value, (name,))
        else:
            fields[name] = value
    return fields


def build_tenants(file: PolicyFile, *, check_paths: bool) -> tuple[dict[str, TenantSettings], list[Issue]]:
    """Every tenant's effective settings (the top level is tenant `default`), and any issues."""
    issues: list[Issue] = []
    top = TenantSettings.model_construct(
        name=DEFAULT_TENANT, **{name: getattr(file, name) for name in Settings.model_fields}
    )
    top_origins = _written(file, ())
    done: dict[str, tuple[TenantSettings, Origins]] = {DEFAULT_TENANT: (top, top_origins)}

    if DEFAULT_TENANT in file.tenants:
        issues.append(
            (
                ("tenants", DEFAULT_TENANT),
                f"{DEFAULT_TENANT!r} is the name of the top level's own tenant",
                "another tenant name (the top-level keys are tenant 'default')",
            )
        )

    def settle(name: str, chain: tuple[str, ...]) -> tuple[TenantSettings, Origins]:
        if name in done:
            return done[name]
        section: TenantSection = file.tenants[name]
        parent, parent_origins = top, top_origins
        if section.extends is not None and section.extends != DEFAULT_TENANT:
            if section.extends not in file.tenants:
                issues.append(
                    (
                        ("tenants", name, "extends"),
                        f"tenant {section.extends!r} is not defined",
                        "the name of a tenant under `tenants:` (or leave `extends` out)",
                    )
                )
            elif section.extends in chain or section.extends == name:
                cycle = " -> ".join((*chain, name, section.extends))
                issues.append(
                    (
                        ("tenants", name, "extends"),
                        f"tenants extend each other in a cycle ({cycle})",
                        "a chain of `extends` that ends at the top level",
                    )
                )
            else:
                parent, parent_origins = settle(section.extends, (*chain, name))
        fields = _overlay(parent, section)
        settings = TenantSettings.model_construct(name=name, **fields)
        origins = {**parent_origins, **_written(section, ("tenants", name))}
        done[name] = (settings, origins)
        return settings, origins

    for name in file.tenants:
        if name != DEFAULT_TENANT:
            settle(name, ())

    for name, (settings, origins) in done.items():
        own = () if name == DEFAULT_TENANT else ("tenants", name)
        section = file.tenants.get(name)
        issues.extend(_check(settings, origins, own, top, section))

    if check_paths:
        sections: list[tuple[KeyPath, Settings]] = [((), file)]
        sections += [(("tenants", n), t) for n, t in file.tenants.items()]
        for base, sec in sections:
            if "images" in sec.model_fields_set or base == ():
                for name, project in sec.projects.items() if "projects" in sec.model_fields_set else ():
                    if not Path(project.path).is_dir():
                        issues.append(
                            (
                                (*base, "projects", name, "path"),
                                f"{project.path} does not exist or is not a directory",
                                "an existing host directory (the project to mount)",
                            )
                        )
                for image, entry in sec.images.catalog.items():
                    if entry.path is not None and not Path(entry.path).is_dir():
                        issues.append(
                            (
                                (*base, "images", "catalog", image),
                                f"{entry.path} does not exist or is not a directory",
                                "an existing directory holding an unpacked root filesystem",
                            )
                        )
    return {name: s for name, (s, _) in done.items()}, _dedupe(issues)


def mount_clash(s: Settings, extra: dict[str, Any] | None = None) -> str | None:
    """Why the workspace and project mount points overlap, or None.

    Mounts may not nest: a project inside the workspace would need a
    directory in the workspace image to mount on, and one mount hiding
    another is never what the operator meant. `extra`: projects the server
    adds (`serve --project`).
    """
    points: list[tuple[str, str]] = []
    if s.workspace.enabled:
        points.append(("the workspace", s.workspace.mount))
    for name, project in {**s.projects, **(extra or {})}.items():
        points.append((f"project {name!r}", project.mount_point(name)))
    for i, (a, pa) in enumerate(points):
        for b, pb in points[i + 1 :]:
            if pa == pb or pb.startswith(pa.rstrip("/") + "/") or pa.startswith(pb.rstrip("/") + "/"):
                return f"{a} ({pa}) and {b} ({pb}) overlap"
    return None


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen: set[Issue] = set()
    out = []
    for issue in issues:
        if issue not in seen:
            seen.add(issue)
            out.append(issue)
    return out


def _mine(path: KeyPath | None, own: KeyPath) -> bool:
    return path is not None and path[: len(own)] == own


def _check(
    s: TenantSettings,
    origins: Origins,
    own: KeyPath,
    top: TenantSettings,
    section: TenantSection | None,
) -> list[Issue]:
    """Cross-key rules for one tenant; each issue is blamed on a key this tenant wrote."""
    issues: list[Issue] = []
    who = "" if s.name == DEFAULT_TENANT else f" (tenant {s.name!r})"

    def blame(*keys: tuple[str, ...]) -> KeyPath | None:
        """The first of `keys` written in this tenant's own section, else None (inherited)."""
        for key in keys:
            if _mine(origins.get(key), own) or (own == () and key in origins):
                return origins[key]
        return None

    def fallback(*keys: tuple[str, ...]) -> KeyPath:
        if own == ():
            for key in keys:
                if key in origins:
                    return origins[key]
            return (keys[0][0],)
        return own

    for key in RESOURCES:
        default, ceiling = getattr(s.defaults, key), getattr(s.ceilings, key)
        if default > ceiling:
            where = blame(("defaults", key), ("ceilings", key))
            if where is None and own != ():
                continue  # inherited as is: reported where it was written
            issues.append(
                (
                    where or fallback(("defaults", key), ("ceilings", key)),
                    f"defaults.{key} {show(key, default)} is above ceilings.{key} {show(key, ceiling)}{who}",
                    f"a default at or below its ceiling (lower defaults.{key} or raise ceilings.{key})",
                )
            )

    if own != () and not (section is not None and section.allow_above_ceilings):
        for key in RESOURCES:
            mine, limit = getattr(s.ceilings, key), getattr(top.ceilings, key)
            if mine > limit:
                where = blame(("ceilings", key)) or (*own, "extends")
                issues.append(
                    (
                        where,
                        f"ceilings.{key} {show(key, mine)}{who} is above the top-level ceiling {show(key, limit)}",
                        f"at most {show(key, limit)}, or `allow_above_ceilings: true` in tenants.{s.name}",
                    )
                )
        wider = [str(r) for r in s.network.egress.allow if not any(mine.covers(r) for mine in top.network.egress.allow)]
        if wider:
            where = blame(("network", "egress", "allow"), ("network", "egress")) or (*own, "extends")
            issues.append(
                (
                    where,
                    f"egress rule(s) {', '.join(wider)}{who} are not within the top level's network.egress.allow",
                    f"rules the top level allows, or `allow_above_ceilings: true` in tenants.{s.name}",
                )
            )
        for key, unit in (("max_connections", ""), ("max_bytes", " bytes"), ("idle_timeout", " s")):
            mine, limit = getattr(s.network.egress, key), getattr(top.network.egress, key)
            if mine > limit:
                where = blame(("network", "egress", key)) or (*own, "extends")
                issues.append(
                    (
                        where,
                        f"network.egress.{key} {mine:g}{unit}{who} is above the top level's {limit:g}{unit}",
                        f"at most {limit:g}{unit}, or `allow_above_ceilings: true` in tenants.{s.name}",
                    )
                )
        extra = [m for m in s.network.allowed if m not in top.network.allowed]
        if extra:
            where = blame(("network", "allowed")) or (*own, "extends")
            issues.append(
                (
                    where,
                    f"network mode(s) {', '.join(extra)}{who} are not allowed at the top level",
                    f"a subset of {list(top.network.allowed)}, or `allow_above_ceilings: true` in tenants.{s.name}",
                )
            )

    if s.defaults.network not in s.network.allowed:
        where = blame(("defaults", "network"), ("network", "allowed"))
        if where is not None or own == ():
            issues.append(
                (
                    where or fallback(("defaults", "network"), ("network", "allowed")),
                    f"defaults.network {s.defaults.network!r} is not in network.allowed {list(s.network.allowed)}{who}",
                    "a default network mode listed in network.allowed",
                )
            )

    for i, image in enumerate(s.images.allowed):
        if image != BUILTIN_IMAGE and image not in s.images.catalog:
            where = blame(("images", "allowed"), ("images", "catalog"))
            if where is not None or own == ():
                base = where or fallback(("images", "allowed"))
                if base[-1] == "allowed":
                    base = (*base, i)
                issues.append(
                    (
                        base,
                        f"image {image!r}{who} is not in images.catalog",
                        f"'{BUILTIN_IMAGE}' or a name defined under images.catalog",
                    )
                )
    if s.defaults.image not in s.images.allowed:
        where = blame(("defaults", "image"), ("images", "allowed"))
        if where is not None or own == ():
            issues.append(
                (
                    where or fallback(("defaults", "image"), ("images", "allowed")),
                    f"defaults.image {s.defaults.image!r} is not in images.allowed {list(s.images.allowed)}{who}",
                    "a default image listed in images.allowed",
                )
            )

    clash = mount_clash(s)
    if clash:
        where = blame(("projects",), ("workspace", "mount"))
        if where is not None or own == ():
            issues.append(
                (
                    where or fallback(("projects",), ("workspace", "mount")),
                    f"{clash}{who}",
                    "each project at its own mount point, not on or inside the workspace or another project",
                )
            )

    set_bytes = sum(len(k) + len(v) + 2 for k, v in s.env.set.items())
    if len(s.env.set) + s.env.max_vars > MAX_ENV or set_bytes + s.env.max_bytes > MAX_ENV_BYTES:
        where = blame(("env", "set"), ("env", "max_vars"), ("env", "max_bytes"))
        if where is not None or own == ():
            issues.append(
                (
                    where or fallback(("env", "set"), ("env", "max_vars")),
                    f"env.set plus env.max_vars/max_bytes{who} can exceed the sandbox's limit "
                    f"of {MAX_ENV} variables / {format_bytes(MAX_ENV_BYTES)}",
                    "a smaller env.max_vars or env.max_bytes",
                )
            )
    return issues
