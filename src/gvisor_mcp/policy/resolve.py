"""resolve(): one request + the caller's tenant -> ContainerOptions and a receipt.

Pure (no filesystem, no clock). The tenant, the session and every host path
come from the server's arguments; a request can only ask for values the
tenant's policy then grants, clamps or refuses. The result is built as a
`ContainerOptions`, so it passes the sandbox's own validation or the request
is refused here, before anything exists.

Why over ~400 lines: resolve() is one pure function whose field-by-field
decisions (grant, clamp, refuse) must read as one receipt; the helpers it
needs are only its own.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import posixpath
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..images.errors import ImageError
from ..images.store import ImageStore
from ..network.egress import EgressError, EgressRules
from ..sandbox.options import (
    ENV_KEY_RE,
    ContainerOptions,
    InvalidOptionsError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
)
from .errors import PolicyDenied, denied_by
from .loader import Policy
from .model import BUILTIN_IMAGE, Output, Quotas, TenantSettings
from .receipt import LimitsReceipt, ReceiptEntry
from .request import ExecRequest
from .units import format_bytes

SHELL = "/bin/sh"
SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_STDIN_BYTES = 4 * 1024 * 1024
"""stdin a request may carry (the HTTP transport's default body limit is
4 MiB too); larger data belongs in a workspace file."""
SHARED_DIR = "shared"
SESSIONS_DIR = "sessions"
NAMED_DIR = "named"


class WorkspacePlan(BaseModel):
    """Where the run's workspace lives on the host and where it is mounted.

    The server creates `host_path` (owned by the sandbox user) before the run;
    resolve() only derives it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host_path: Path
    mount: str
    scope: str
    size_mb: int
    name: str | None = None
    """A named workspace (stdio's `--workspace NAME`): kept when the session ends."""

    @property
    def kept(self) -> bool:
        """Outlives its session: the tenant's shared one, or a named one."""
        return self.scope == "tenant" or self.name is not None


class Resolved(BaseModel):
    """Everything the server needs to admit and start one run."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    options: ContainerOptions
    receipt: LimitsReceipt
    settings: TenantSettings
    """The tenant's effective policy snapshot this run was admitted under."""
    output: Output
    """Head/tail bytes of each stream shown to the model."""
    quotas: Quotas
    foreground_limit: float
    """Seconds execute_command waits before returning a still-running handle."""
    workspace: WorkspacePlan | None

    @property
    def workspace_path(self) -> Path | None:
        return self.workspace.host_path if self.workspace else None


def path_component(name: str) -> str:
    """A tenant or session name as ONE safe directory name.

    Names that are already safe (letters, digits, `_ . -`, not starting with
    `.` or `-`, at most 64 bytes) are kept so operators can read the tree;
    anything else becomes `@` + a hash. `@` never appears in a kept name, so
    two different names can never share a directory.
    """
    if SAFE_COMPONENT.match(name):
        return name
    return "@" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def workspace_host_path(
    workspace_root: Path, tenant: str, scope: str, session_id: str | None, name: str | None = None
) -> Path:
    """`<root>/<tenant>/shared` (scope tenant), `<root>/<tenant>/named/<name>`
    (scope session, a named workspace: stdio's) or `<root>/<tenant>/sessions/<session>`."""
    base = Path(workspace_root) / path_component(tenant)
    if scope == "tenant":
        return base / SHARED_DIR
    if name is not None:
        return base / NAMED_DIR / path_component(name)
    if session_id is None:
        raise ValueError("the policy's workspace scope is 'session' but no session_id was given")
    return base / SESSIONS_DIR / path_component(session_id)


NO_SESSION_NOTE = (
    "no workspace: this policy's workspace is per session and this call has no session "
    "(protocol 2026-07-28 over HTTP is sessionless); create one with create_workspace and "
    "pass its id as `workspace`"
)


def plan_workspace(
    s: TenantSettings,
    tenant: str,
    workspace_root: Path | None,
    session_id: str | None,
    workspace_name: str | None = None,
) -> WorkspacePlan | None:
    """Where the caller's workspace is, or None when it has none.

    None when the policy disables it, and when the scope is `session` but
    the call has neither a session nor a named workspace (sessionless HTTP):
    such a call gets no workspace rather than one shared with other callers.
    """
    if not s.workspace.enabled:
        return None
    if workspace_root is None:
        raise ValueError("the policy enables a workspace but the server gave no workspace_root")
    if not Path(workspace_root).is_absolute():
        raise ValueError(f"workspace_root must be an absolute path, got {workspace_root}")
    scope = s.workspace.scope
    if scope == "session" and session_id is None and workspace_name is None:
        return None
    host = workspace_host_path(Path(workspace_root), tenant, scope, session_id, workspace_name)
    return WorkspacePlan(
        host_path=host,
        mount=s.workspace.mount,
        scope=scope,
        size_mb=s.workspace.size,
        name=workspace_name if scope == "session" else None,
    )


def project_mounts(s: TenantSettings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """name -> Project: the policy's projects plus the server's (`serve --project`)."""
    return {**s.projects, **(extra or {})}


def _fmt(field: str, value: float) -> str:
    if field == "memory_mb":
        return f"{value:g} MiB"
    if field == "timeout_seconds":
        return f"{value:g} s"
    if field == "cpus":
        return f"{value:g} CPUs"
    return f"{value:g}"


class _Resolver:
    def __init__(self, settings: TenantSettings) -> None:
        self.s = settings
        self.entries: list[ReceiptEntry] = []
        self.notes: list[str] = []

    def number(self, field: str, requested: Any, default: float, ceiling: float, minimum: float) -> float:
        """A resource: default, granted, clamped or denied."""
        allowed = f"{_fmt(field, minimum)} to {_fmt(field, ceiling)} (default {_fmt(field, default)})"
        hint = f"Ask again with {field} at most {ceiling:g}, or leave {field} out to get {default:g}."
        if requested is None:
            self.entries.append(ReceiptEntry(field=field, granted=default, rule="default", limit=ceiling))
            return default
        if isinstance(requested, bool) or not isinstance(requested, (int, float)) or not math.isfinite(requested):
            raise PolicyDenied(field, requested, allowed, hint)
        if requested < minimum:
            raise PolicyDenied(
                field,
                requested,
                allowed,
                f"Ask again with {field} of at least {minimum:g}, or leave {field} out to get {default:g}.",
            )
        if requested > ceiling:
            if self.s.on_exceed != "clamp":
                raise PolicyDenied(field, requested, allowed, hint)
            self.entries.append(
                ReceiptEntry(
                    field=field, requested=requested, granted=ceiling, rule="clamped to ceiling", limit=ceiling
                )
            )
            self.notes.append(
                f"{field}: asked {_fmt(field, requested)}, granted {_fmt(field, ceiling)} (clamped to the ceiling)"
            )
            return ceiling
        self.entries.append(
            ReceiptEntry(field=field, requested=requested, granted=requested, rule="requested", limit=ceiling)
        )
        return requested

    def choice(self, field: str, requested: str | None, default: str, allowed: tuple[str, ...]) -> str:
        if requested is None:
            self.entries.append(ReceiptEntry(field=field, granted=default, rule="default"))
            return default
        if requested not in allowed:
            raise PolicyDenied(
                field,
                requested,
                "one of " + ", ".join(allowed) + f" (default {default})",
                f"Ask again with {field} set to one of: {', '.join(allowed)}; or leave {field} out.",
            )
        self.entries.append(ReceiptEntry(field=field, requested=requested, granted=requested, rule="requested"))
        return requested

    def egress(self, requested: list[str] | None, network: str) -> EgressRules | None:
        """network=sandbox: the policy's allowlist, or the request's narrower one."""
        rules = self.s.network.egress.rules()
        allowed = rules.describe()
        if network != "sandbox":
            if requested is not None:
                raise PolicyDenied(
                    "egress",
                    requested,
                    "an egress list only with network 'sandbox'",
                    "Ask again with network='sandbox' (if the policy allows it), or leave egress out.",
                )
            return None
        if requested is None:
            self.entries.append(ReceiptEntry(field="egress", granted=[str(x) for x in rules.allow], rule="policy"))
            return rules
        if not isinstance(requested, (list, tuple)):
            raise PolicyDenied("egress", requested, f"a list of rules within: {allowed}", "Ask again with a list.")
        try:
            narrowed = rules.narrowed(requested)
        except EgressError as e:
            raise PolicyDenied(
                "egress",
                requested,
                f"rules within the egress allowlist: {allowed}",
                f"{e}. Ask again with rules from that list (or narrower: fewer ports, a sub-domain, "
                "a smaller CIDR), or leave egress out to get all of it.",
            ) from None
        self.entries.append(
            ReceiptEntry(
                field="egress", requested=list(requested), granted=[str(x) for x in narrowed.allow], rule="requested"
            )
        )
        return narrowed

    def workdir(self, requested: str | None, default: str) -> str:
        if requested is None:
            self.entries.append(ReceiptEntry(field="workdir", granted=default, rule="default"))
            return default
        allowed = f"an absolute path, or one relative to {default}, without '..' or NUL"
        hint = f"Ask again with a path like {default}/src, or leave workdir out to use {default}."
        if "\x00" in requested or not requested.strip():
            raise PolicyDenied("workdir", requested, allowed, hint)
        path = requested if requested.startswith("/") else posixpath.join(default, requested)
        if ".." in path.split("/") or len(path.encode()) > 4096:
            raise PolicyDenied("workdir", requested, allowed, hint)
        path = posixpath.normpath(path) if path != "/" else "/"
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        self.entries.append(ReceiptEntry(field="workdir", requested=requested, granted=path, rule="requested"))
        return path

    def env(self, requested: dict[str, str] | None) -> dict[str, str]:
        rules = self.s.env
        fixed = dict(rules.set)
        asked = dict(requested or {})
        excluded = list(rules.deny) + sorted(fixed)
        allow_text = (
            f"keys matching {list(rules.allow)}"
            + (f" except {excluded}" if excluded else "")
            + f"; at most {rules.max_vars} variables, {format_bytes(rules.max_bytes)}"
        )
        for key, value in asked.items():
            if not isinstance(key, str) or not ENV_KEY_RE.match(key):
                raise PolicyDenied(
                    "env",
                    key,
                    "names of letters, digits and '_', not starting with a digit",
                    "Rename the variable and ask again.",
                )
            if key in fixed:
                raise PolicyDenied(
                    f"env.{key}",
                    value,
                    f"{key}={fixed[key]!r}, fixed by the policy",
                    f"Leave {key} out of env; it is always set to {fixed[key]!r}.",
                )
            if any(fnmatch.fnmatchcase(key, p) for p in rules.deny):
                raise PolicyDenied(
                    f"env.{key}", value, allow_text, f"Ask again without {key}; this policy never allows it."
                )
            if not any(fnmatch.fnmatchcase(key, p) for p in rules.allow):
                raise PolicyDenied(
                    f"env.{key}",
                    value,
                    allow_text,
                    f"Ask again without {key}, or use a name matching {list(rules.allow)}.",
                )
            if not isinstance(value, str) or "\x00" in value:
                raise PolicyDenied(
                    f"env.{key}", value, "a string without NUL characters", "Fix the value and ask again."
                )
        if len(asked) > rules.max_vars:
            raise PolicyDenied(
                "env",
                f"<{len(asked)} variables>",
                allow_text,
                f"Ask again with at most {rules.max_vars} variables (write more settings to a file in the command).",
            )
        size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in asked.items())
        if size > rules.max_bytes:
            raise PolicyDenied(
                "env",
                f"<{size} bytes>",
                allow_text,
                f"Ask again with at most {format_bytes(rules.max_bytes)} of variables (pass large data via stdin or a file).",
            )
        self.entries.append(
            ReceiptEntry(
                field="env",
                requested=sorted(asked) if requested is not None else None,
                granted=sorted({**fixed, **asked}),
                rule="requested" if asked else "default",
            )
        )
        return {**fixed, **asked}


def _image(s: TenantSettings, image: str, images: ImageStore | None) -> tuple[str | None, bool, str | None]:
    """(rootfs, read-only, digest) of an allowed image name."""
    if image == BUILTIN_IMAGE:
        return None, False, None
    entry = s.images.catalog[image]
    if entry.path is not None:
        return entry.path, not entry.writable, None
    if images is None:
        raise ValueError("the policy names store images but the server gave resolve() no image store")
    try:
        stored = images.get(entry.store or "")
    except ImageError:
        others = [i for i in s.images.allowed if i != image]
        raise PolicyDenied(
            "image",
            image,
            "one of " + ", ".join(s.images.allowed) + " (this one is not in the server's image store yet)",
            "The operator has to build, pull or import it (gvisor-mcp image ...). Meanwhile ask again "
            + (f"with image set to one of: {', '.join(others)}, or " if others else "")
            + "without image.",
        ) from None
    return stored.rootfs, not entry.writable, stored.digest


def resolve(
    policy: Policy,
    request: ExecRequest,
    tenant: str,
    *,
    workspace_root: Path | None,
    session_id: str | None,
    workspace_name: str | None = None,
    extra_projects: dict[str, Any] | None = None,
    images: ImageStore | None = None,
) -> Resolved:
    """Turn `request` into options for `tenant`, or raise PolicyDenied.

    `tenant` and `session_id` come from the server (start-up choice or the
    bearer token; the MCP session), never from the request; so do
    `workspace_name` (stdio's named workspace, or one the agent created
    through the server) and `extra_projects` (`serve --project`). `workspace_root`
    is a server-owned directory; it must be given when the tenant's policy
    enables the workspace (ValueError otherwise: a server bug, not a denial).
    Raises UnknownTenant for a tenant the policy does not define. `images`
    is the server's image store, where catalog entries `{store: NAME}` are
    looked up (the one filesystem read here: a name can move to a rebuilt
    image at any time, and the run gets the image it points at now).
    """
    s = policy.tenant(tenant)
    r = _Resolver(s)
    d, c = s.defaults, s.ceilings

    timeout = r.number("timeout_seconds", request.timeout_seconds, d.timeout, c.timeout, 0.001)
    cpus = r.number("cpus", request.cpus, d.cpus, c.cpus, 0.01)
    memory = r.number("memory_mb", request.memory_mb, d.memory, c.memory, 16)
    pids = r.number("max_pids", request.max_pids, d.max_pids, c.max_pids, 4)
    r.entries.append(ReceiptEntry(field="max_output_bytes", granted=d.max_output, rule="policy", limit=c.max_output))
    network = r.choice("network", request.network, d.network, s.network.allowed)
    egress = r.egress(request.egress, network)
    image = r.choice("image", request.image, d.image, s.images.allowed)
    rootfs, read_only, digest = _image(s, image, images)
    plan = plan_workspace(s, tenant, workspace_root, session_id, workspace_name)
    workdir = r.workdir(request.workdir, d.workdir or (plan.mount if plan else "/tmp"))
    env = r.env(request.env)
    r.entries.append(ReceiptEntry(field="user", granted=d.user, rule="policy"))

    mounts: tuple[Mount, ...] = ()
    shown: list[dict[str, Any]] = []
    if plan is not None:
        mounts = (Mount(destination=plan.mount, source=str(plan.host_path), type="bind", read_only=False),)
        shown.append(
            {
                "name": "workspace",
                "mount": plan.mount,
                "access": "read-write",
                "kept": plan.kept,
                "size": format_bytes(plan.size_mb * 1024 * 1024),
            }
        )
    elif s.workspace.enabled:
        r.notes.append(NO_SESSION_NOTE)
    for name, project in sorted(project_mounts(s, extra_projects).items()):
        point = project.mount_point(name)
        mounts += (Mount(destination=point, source=project.path, type="bind", read_only=project.read_only),)
        shown.append({"name": name, "mount": point, "access": "read-only" if project.read_only else "read-write"})
    r.entries.append(ReceiptEntry(field="workspace", granted=plan.mount if plan else None, rule="policy"))
    r.entries.append(ReceiptEntry(field="mounts", granted=shown, rule="policy"))

    if request.stdin is not None:
        size = len(request.stdin.encode("utf-8", "surrogatepass") if isinstance(request.stdin, str) else request.stdin)
        if size > MAX_STDIN_BYTES:
            raise PolicyDenied(
                "stdin",
                f"<{size} bytes>",
                f"at most {format_bytes(MAX_STDIN_BYTES)}",
                "Ask again with less stdin: write large data to a file in the workspace "
                "(in pieces, over several calls) and read it from there.",
            )
    if "\x00" in request.command:
        raise PolicyDenied(
            "command", request.command, "a shell command without NUL characters", "Remove the NUL bytes and ask again."
        )
    try:
        options = ContainerOptions(
            command=(SHELL, "-c", request.command),
            workdir=workdir,
            env=env,
            rootfs=rootfs,
            read_only_rootfs=read_only,
            resources=ResourceSpec(
                cpus=float(cpus),
                memory_mb=int(memory),
                max_pids=int(pids),
                timeout=float(timeout),
                max_output_bytes=d.max_output,
            ),
            network=NetworkMode(network),
            egress=egress,
            stdin=request.stdin,
            user=UserSpec.parse(d.user),
            extra_mounts=mounts,
        )
    except InvalidOptionsError as e:
        raise PolicyDenied(e.field, e.value, e.allowed, "Fix this field and ask again.") from None
    except ValidationError as e:
        raise denied_by(e) from None

    receipt = LimitsReceipt(
        tenant=tenant,
        policy_sha256=policy.sha256,
        policy_source=policy.label,
        entries=tuple(r.entries),
        notes=tuple(r.notes),
        image_digest=digest,
    )
    return Resolved(
        options=options,
        receipt=receipt,
        settings=s,
        output=s.output,
        quotas=s.quotas,
        foreground_limit=s.foreground_limit,
        workspace=plan,
    )
