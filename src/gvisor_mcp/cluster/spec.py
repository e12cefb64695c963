"""What a front end may ask of a HostAgent, and how the agent checks it.

A run crosses the network as a `RunSpec`: names, never host paths. The
image is a name the agent looks up in its own catalog; the workspace is a
(tenant, scope, session) reference the agent turns into a directory under
its own root. So a forged spec sent straight to an agent (anyone holding the
Ray token can call actors) cannot name `/` as a root filesystem or bind a
host directory: the model forbids unknown fields, and `to_options` checks
every value against the host's own `HostCeilings` — the front end's policy
decided what it asked for, the host decides what it runs.

Pure: no Ray, no filesystem (the Manager checks paths when it runs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import Refusal
from ..network.egress import EgressError, EgressRules
from ..policy.model import BUILTIN_IMAGE
from ..policy.resolve import SAFE_COMPONENT
from ..results import RESULT_ID_RE
from ..sandbox import (
    ContainerOptions,
    InvalidOptionsError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
)

HASHED_COMPONENT = re.compile(r"^@[0-9a-f]{32}\Z")
HOST_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


M = TypeVar("M", bound=BaseModel)


class SpecRefused(Refusal, ValueError):
    """The agent will not run this spec; the message says what and why
    (the front end passes it on as runner.RunRefused)."""

    kind = "arguments"


class WorkspaceRef(BaseModel):
    """A workspace by name: `<tenant>/shared` or `<tenant>/sessions/<session>`
    under the agent's own workspace root."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    scope: str
    session: str | None = None
    mount: str
    size_mb: int = Field(gt=0)

    @property
    def key(self) -> str:
        """Cluster-wide identity: the same workspace always lives on one host."""
        return f"{self.tenant}/{self.session}" if self.scope == "session" else f"{self.tenant}/shared"

    def host_path(self, root: Path) -> Path:
        if self.scope == "tenant":
            return root / self.tenant / "shared"
        return root / self.tenant / "sessions" / str(self.session)

    @classmethod
    def of_path(cls, root: Path, tenant_dir: str, path: Path | str, mount: str, size_mb: int) -> WorkspaceRef | None:
        """The reference for a front end's workspace directory `path` under its
        `root` (as policy.plan_workspace derives it); None when it is not one of
        the tenant's workspaces."""
        try:
            parts = Path(path).resolve().relative_to(root).parts
        except ValueError:
            return None
        if len(parts) == 2 and parts == (tenant_dir, "shared"):
            return cls(tenant=tenant_dir, scope="tenant", mount=mount, size_mb=size_mb)
        if len(parts) == 3 and parts[:2] == (tenant_dir, "sessions"):
            return cls(tenant=tenant_dir, scope="session", session=parts[2], mount=mount, size_mb=size_mb)
        return None


class RunSpec(BaseModel):
    """One command for an agent to run. JSON-able, names only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    result_id: str
    tenant: str
    command: tuple[str, ...]
    workdir: str = "/"
    env: dict[str, str] | None = None
    stdin: bytes | None = None
    resources: ResourceSpec = ResourceSpec()
    network: str = NetworkMode.NONE.value
    image: str = BUILTIN_IMAGE
    image_digest: str | None = None
    """The digest the front end's policy resolved for a store image: the agent
    runs that content or nothing (digests name content, the same on every host)."""
    user: UserSpec | None = None
    read_only_rootfs: bool = False
    workspace: WorkspaceRef | None = None
    egress: EgressRules | None = None
    """network=sandbox: the run's allowlist as the front end's policy narrowed it."""


class HostCeilings(BaseModel):
    """What this host runs at most, whatever a front end asks.

    None means no ceiling for that field (then 0 = unlimited is accepted).
    Network `host` is not in the default: a sandbox on the host's network
    could reach Ray's ports and the other nodes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpus: float | None = None
    memory_mb: int | None = 16 * 1024
    max_pids: int | None = 4096
    timeout: float | None = 24 * 3600.0
    max_output_bytes: int | None = 64 * 1024 * 1024
    stdin_bytes: int = 4 * 1024 * 1024
    workspace_mb: int = 16 * 1024
    networks: tuple[str, ...] = (NetworkMode.NONE.value,)
    images: dict[str, str] = {}
    """Image name -> an unpacked rootfs directory on this host, or `store:REF`
    for an image of this agent's image store (besides the built-in)."""
    egress: EgressRules = EgressRules()
    """network=sandbox: the widest allowlist this host grants; a run's rules
    must each fall within it (nothing by default). Whatever it says, the
    cluster's nodes and Ray's ports stay fenced off (network/fence.py)."""
    file_read_bytes: int = 64 * 1024 * 1024
    file_write_bytes: int = 64 * 1024 * 1024
    file_list_entries: int = 100_000
    """The file tools on this host's workspaces (cluster/agent_files.py): at most
    these per call, whatever a front end's policy says (defaults: the most a
    policy's files.max_read / max_write / max_list may be)."""


def parse_as(model: type[M], data: object, what: str, carries: str) -> M:
    """`model` from what arrived over Ray (re-validated even when it is one
    already: a caller may have built it without checks); SpecRefused with
    pydantic's first reason and what such a message carries."""
    if isinstance(data, model):
        data = data.model_dump()
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or what.split()[-1]
        raise SpecRefused(
            f"{what} refused: {where}: {first['msg'].removeprefix('Value error, ')} ({carries})"
        ) from None


def parse_spec(data: object) -> RunSpec:
    """A RunSpec from what arrived over Ray; SpecRefused with pydantic's reason."""
    return parse_as(
        RunSpec,
        data,
        "run spec",
        "a spec carries names, never host paths: command, workdir, env, stdin, resources, "
        "network, image, user, read_only_rootfs, workspace",
    )


def _dir_name(name: str) -> bool:
    """One directory name as policy.path_component makes them (kept or hashed)."""
    return bool(SAFE_COMPONENT.match(name) and "\n" not in name) or bool(HASHED_COMPONENT.match(name))


def _over(field: str, value: float, ceiling: float | None, unit: str = "") -> None:
    if ceiling is None:
        return
    if value == 0 or value > ceiling:
        shown = "unlimited" if value == 0 else f"{_num(value)}{unit}"
        raise SpecRefused(f"run spec refused: {field}={shown} is above this host's ceiling of {_num(ceiling)}{unit}")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def to_options(
    spec: RunSpec,
    ceilings: HostCeilings,
    defaults: ResourceSpec,
    workspace_root: Path,
    images: Any = None,
) -> ContainerOptions:
    """ContainerOptions for `spec` on this host, or SpecRefused naming the field.

    Checks the effective resources (the spec's, zeros filled from the host's
    defaults) against the ceilings, names against the catalog, and builds
    every host path itself; `images` is this host's ImageStore (for
    `store:` entries of the ceilings' catalog).
    """
    if not RESULT_ID_RE.match(spec.result_id):
        raise SpecRefused(f"run spec refused: result_id={spec.result_id[:80]!r} is not res_ + 32 hex digits")
    if not _dir_name(spec.tenant):
        raise SpecRefused(f"run spec refused: tenant={spec.tenant[:80]!r} is not a tenant directory name")
    res = spec.resources.merged_over(defaults)
    # No CPU limit means at most every core of this host.
    _over("cpus", res.cpus or float(os.cpu_count() or 1), ceilings.cpus)
    _over("memory_mb", res.memory_mb, ceilings.memory_mb, " MiB")
    _over("max_pids", res.max_pids, ceilings.max_pids)
    _over("timeout", res.timeout, ceilings.timeout, " s")
    _over("max_output_bytes", res.max_output_bytes, ceilings.max_output_bytes)
    if spec.stdin is not None and len(spec.stdin) > ceilings.stdin_bytes:
        raise SpecRefused(
            f"run spec refused: stdin of {len(spec.stdin)} bytes is above this host's ceiling of "
            f"{ceilings.stdin_bytes} bytes"
        )
    if spec.network not in ceilings.networks:
        raise SpecRefused(
            f"run spec refused: network={spec.network!r}; this host runs {', '.join(ceilings.networks)} "
            "(never 'host' on a cluster node: the sandbox would reach Ray's ports)"
        )
    rootfs = _rootfs(spec, ceilings, images)
    egress = _egress(spec, ceilings)
    mounts: tuple[Mount, ...] = ()
    ws = spec.workspace
    if ws is not None:
        check_workspace(ws, spec.tenant, ceilings)
        try:
            mounts = (
                Mount(destination=ws.mount, source=str(ws.host_path(workspace_root)), type="bind", read_only=False),
            )
        except ValidationError as e:
            raise SpecRefused(f"run spec refused: workspace.mount: {e.errors()[0]['msg']}") from None
    try:
        return ContainerOptions(
            command=spec.command,
            workdir=spec.workdir,
            env=spec.env,
            rootfs=rootfs,
            resources=res,
            network=NetworkMode(spec.network),
            stdin=spec.stdin,
            user=spec.user,
            read_only_rootfs=spec.read_only_rootfs,
            extra_mounts=mounts,
            egress=egress,
        )
    except (InvalidOptionsError, ValidationError, ValueError) as e:
        text = str(e)
        if isinstance(e, ValidationError):
            text = e.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise SpecRefused(f"run spec refused: {text}") from None


def check_workspace(ws: WorkspaceRef, tenant: str, ceilings: HostCeilings, what: str = "run spec") -> None:
    """SpecRefused unless `ws` names a workspace directory of `tenant` (never
    a path: each part is a directory name) within this host's size ceiling."""
    if not _dir_name(tenant):
        raise SpecRefused(f"{what} refused: tenant={tenant[:80]!r} is not a tenant directory name")
    if ws.tenant != tenant:
        raise SpecRefused(f"{what} refused: workspace.tenant={ws.tenant[:80]!r} is not the {what}'s tenant")
    if ws.scope == "tenant":
        if ws.session is not None:
            raise SpecRefused(f"{what} refused: a tenant-scoped workspace has no session")
    elif ws.scope != "session" or ws.session is None or not _dir_name(ws.session):
        raise SpecRefused(
            f"{what} refused: workspace scope={ws.scope!r} session={str(ws.session)[:80]!r}: "
            "scope is 'tenant', or 'session' with a session directory name"
        )
    if ws.size_mb > ceilings.workspace_mb:
        raise SpecRefused(
            f"{what} refused: workspace.size_mb={ws.size_mb} is above this host's ceiling of "
            f"{ceilings.workspace_mb} MiB"
        )


def _rootfs(spec: RunSpec, ceilings: HostCeilings, images: Any) -> str | None:
    """The host's own directory for the image name; the digest must match."""
    if spec.image == BUILTIN_IMAGE:
        if spec.image_digest is not None:
            raise SpecRefused(f"run spec refused: image={BUILTIN_IMAGE!r} has no digest")
        return None
    entry = ceilings.images.get(spec.image)
    if entry is None:
        raise SpecRefused(
            f"run spec refused: image={spec.image!r} is not in this host's catalog "
            f"({', '.join([BUILTIN_IMAGE, *ceilings.images])})"
        )
    if not entry.startswith("store:"):
        if spec.image_digest is not None:
            raise SpecRefused(
                f"run spec refused: image={spec.image!r} is a directory on this host, not a store image "
                f"with digest {spec.image_digest[:80]!r}"
            )
        return entry
    from ..images.store import ImageError

    if images is None:
        raise SpecRefused(f"run spec refused: image={spec.image!r}: this host has no image store")
    try:
        stored = images.get(entry.removeprefix("store:"))
    except ImageError as e:
        raise SpecRefused(f"run spec refused: image={spec.image!r} is not in this host's image store ({e})") from None
    if spec.image_digest is not None and spec.image_digest != stored.digest:
        raise SpecRefused(
            f"run spec refused: image={spec.image!r} is {stored.digest} on this host, the front end asked for "
            f"{spec.image_digest[:80]}; the operator must build or pull the same image on every host"
        )
    return stored.rootfs


def _egress(spec: RunSpec, ceilings: HostCeilings) -> EgressRules | None:
    """The run's rules if each is within this host's egress ceiling, limits at the lower of the two."""
    if spec.egress is None:
        return None
    if spec.network != NetworkMode.SANDBOX.value:
        raise SpecRefused(f"run spec refused: egress rules need network='sandbox', not {spec.network!r}")
    mine = ceilings.egress
    try:
        narrowed = mine.narrowed([r.model_dump(mode="json", exclude_none=True) for r in spec.egress.allow])
    except EgressError as e:
        raise SpecRefused(f"run spec refused: egress: {e} (this host's egress ceiling)") from None
    for name, addrs in spec.egress.hosts.items():
        if mine.hosts.get(name) != addrs:
            raise SpecRefused(
                f"run spec refused: egress.hosts: {name} -> {', '.join(map(str, addrs))} is not one of this "
                "host's static names (the agent resolves names itself)"
            )
    return narrowed.model_copy(
        update={
            "hosts": dict(spec.egress.hosts),
            "max_connections": min(spec.egress.max_connections, mine.max_connections),
            "max_bytes": min(spec.egress.max_bytes, mine.max_bytes),
            "idle_timeout": min(spec.egress.idle_timeout, mine.idle_timeout),
        }
    )


def default_ceilings() -> HostCeilings:
    """The ceilings of an agent started without any: CPUs capped at this host's count."""
    return HostCeilings(cpus=float(os.cpu_count() or 1))


def ceilings(args: Any) -> HostCeilings:
    """`gvisor-mcp agent`'s flags as this host's ceilings; ValueError saying which flag is wrong."""
    images: dict[str, str] = {}
    for item in getattr(args, "image", None) or ():
        name, sep, where = item.partition("=")
        if not sep or not name or not where or not (where.startswith(("store:", "/"))):
            raise ValueError(f"--image {item!r}: expected NAME=/absolute/rootfs or NAME=store:REF")
        images[name] = where
    sandbox = bool(getattr(args, "sandbox_network", False))
    rules = list(getattr(args, "egress", None) or ())
    if rules and not sandbox:
        raise ValueError("--egress needs --sandbox-network (egress rules apply to network=sandbox runs)")
    try:
        egress = EgressRules(allow=rules)
    except (EgressError, ValidationError) as e:
        raise ValueError(f"--egress: {e}") from None
    return default_ceilings().model_copy(
        update={
            "images": images,
            "egress": egress,
            "networks": (NetworkMode.NONE.value, *((NetworkMode.SANDBOX.value,) if sandbox else ())),
        }
    )
