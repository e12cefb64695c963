"""The policy file as frozen pydantic models: one class per YAML section.

Every model forbids unknown keys (a misspelt `memroy:` must not silently
leave the default in force) and parses human units on the way in (see
units.py). Field defaults ARE the built-in baseline: a key left out of the
file takes the value written here, and `policies/default.yaml` spells the
same values out (a test keeps them equal).

A tenant section reuses `Settings` but only the keys it actually writes
(pydantic's `model_fields_set`) override what it inherits; see effective.py.

Why over ~400 lines: one class per YAML section, and docs/policy.md follows
this file key by key; splitting the sections would split that map.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..network.egress import (
    RULE_EXPECTED,
    EgressError,
    EgressRule,
    EgressRules,
    _host_map,
    parse_rule,
)
from ..sandbox.options import (
    ENV_KEY_RE,
    MAX_CPUS,
    MAX_ENV,
    MAX_ENV_BYTES,
    MAX_MEMORY_MB,
    MAX_OUTPUT_BYTES,
    MAX_PIDS,
    MAX_TIMEOUT,
    InvalidOptionsError,
    UserSpec,
)
from .units import (
    CPUS_EXPECTED,
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    UnitError,
    format_bytes,
    format_duration,
    format_mib,
    parse_bytes,
    parse_cpus,
    parse_duration,
    parse_mib,
)

NetworkName = Literal["none", "sandbox", "host"]
OnExceed = Literal["reject", "clamp"]
WorkspaceScope = Literal["session", "tenant"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
DEFAULT_TENANT = "default"
"""The tenant whose settings are the file's top level; always defined."""
BUILTIN_IMAGE = "host"
"""The image name meaning the sandbox's built-in image (ContainerOptions.rootfs=None)."""


def _bounded(parse: Any, low: float, high: float, describe: Any, expected: str) -> Any:
    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed < low or parsed > high:
            raise UnitError(f"{value!r} is out of range; expected {expected} from {describe(low)} to {describe(high)}")
        return parsed

    return check


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnitError(f"got {type(value).__name__} {value!r}; expected a whole number")
    return value


def _count(low: int, high: int) -> Any:
    def check(value: Any) -> int:
        n = _strict_int(value)
        if n < low or n > high:
            raise UnitError(f"{value!r} is out of range; expected a whole number from {low} to {high:,}")
        return n

    return check


def _size_schema(bare: str) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "description": f"a bare number is {bare}"},
                {
                    "type": "string",
                    "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*(B|KiB|Ki|MiB|Mi|GiB|Gi|TiB|Ti)?\s*$",
                },
            ],
            "description": SIZE_EXPECTED,
        }
    )


Cpus = Annotated[
    float,
    BeforeValidator(_bounded(parse_cpus, 0.01, MAX_CPUS, lambda v: f"{v:g}", CPUS_EXPECTED)),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_CPUS, "description": CPUS_EXPECTED}),
]
MemoryMiB = Annotated[
    int,
    BeforeValidator(_bounded(parse_mib, 16, MAX_MEMORY_MB, format_mib, "a memory size")),
    PlainSerializer(format_mib, return_type=str, when_used="json"),
    _size_schema("MiB"),
]
"""Memory in whole MiB; at least 16 MiB (the sandbox itself needs ~12 MiB)."""
OutputBytes = Annotated[
    int,
    BeforeValidator(_bounded(parse_bytes, 1024, MAX_OUTPUT_BYTES, format_bytes, "a size")),
    PlainSerializer(format_bytes, return_type=str, when_used="json"),
    _size_schema("bytes"),
]
ShownBytes = Annotated[
    int,
    BeforeValidator(_bounded(parse_bytes, 0, 1024 * 1024, format_bytes, "a size")),
    PlainSerializer(format_bytes, return_type=str, when_used="json"),
    _size_schema("bytes"),
]
EnvBytes = Annotated[
    int,
    BeforeValidator(_bounded(parse_bytes, 0, MAX_ENV_BYTES, format_bytes, "a size")),
    PlainSerializer(format_bytes, return_type=str, when_used="json"),
    _size_schema("bytes"),
]
WorkspaceMiB = Annotated[
    int,
    BeforeValidator(_bounded(parse_mib, 1, MAX_MEMORY_MB, format_mib, "a size")),
    PlainSerializer(format_mib, return_type=str, when_used="json"),
    _size_schema("MiB"),
]
Duration = Annotated[
    float,
    BeforeValidator(_bounded(parse_duration, 0.001, MAX_TIMEOUT, format_duration, "a duration")),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
                {"type": "string", "pattern": r"^\s*([0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d)\s*)+$"},
            ],
            "description": DURATION_EXPECTED,
        }
    ),
]
Pids = Annotated[
    int,
    BeforeValidator(_count(4, MAX_PIDS)),
    WithJsonSchema({"type": "integer", "minimum": 4, "maximum": MAX_PIDS}),
]


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise UnitError(f"got {type(value).__name__} {value!r}; expected a name of {NAME_EXPECTED}")
    if not NAME_RE.match(value):
        raise UnitError(f"{value!r} is not a valid name; expected {NAME_EXPECTED}")
    return value


Name = Annotated[
    str,
    BeforeValidator(_name),
    WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern}),
]


def _image_name(value: Any) -> str:
    if value == BUILTIN_IMAGE:
        raise UnitError(f"{BUILTIN_IMAGE!r} is the built-in image and cannot be redefined; expected another name")
    return _name(value)


ImageName = Annotated[str, BeforeValidator(_image_name), WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern})]
"""A catalog entry's name: any name but the built-in `host`."""


def _container_path(value: Any) -> str:
    expected = "an absolute path inside the sandbox, like /workspace"
    if not isinstance(value, str):
        raise UnitError(f"got {type(value).__name__} {value!r}; expected {expected}")
    if not value.startswith("/") or "\x00" in value:
        raise UnitError(f"{value!r} is not absolute; expected {expected}")
    if ".." in value.split("/"):
        raise UnitError(f"{value!r} contains '..'; expected {expected}, without '..'")
    return posixpath.normpath(value) if value != "/" else "/"


ContainerPath = Annotated[str, BeforeValidator(_container_path), WithJsonSchema({"type": "string", "pattern": "^/"})]


def _host_path(value: Any, expected: str = "an absolute host path of a root filesystem directory") -> str:
    if not isinstance(value, str):
        raise UnitError(f"got {type(value).__name__} {value!r}; expected {expected}")
    if not value.startswith("/") or "\x00" in value:
        raise UnitError(f"{value!r} is not absolute; expected {expected}")
    return posixpath.normpath(value)


HostPath = Annotated[str, BeforeValidator(_host_path), WithJsonSchema({"type": "string", "pattern": "^/"})]


def _user(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise UnitError(f'got {type(value).__name__} {value!r}; expected UID:GID, like "1000:1000"')
    try:
        spec = UserSpec.parse(value)
    except InvalidOptionsError:
        raise UnitError(
            f'{value!r} is not a user; expected UID:GID with numbers 0..2147483646, like "1000:1000"'
        ) from None
    return f"{spec.uid}:{spec.gid}"


UserText = Annotated[
    str,
    BeforeValidator(_user),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^[0-9]+(:[0-9]+)?$"}, {"type": "integer"}]}),
]


def _env_key(value: Any) -> str:
    if not isinstance(value, str) or not ENV_KEY_RE.match(value):
        raise UnitError(
            f"{value!r} is not a variable name; expected letters, digits and '_', not starting with a digit"
        )
    return value


EnvKey = Annotated[str, BeforeValidator(_env_key)]


def _pattern(value: Any) -> str:
    expected = "a variable name or fnmatch pattern like MY_* (letters, digits, '_', '*', '?', '[...]')"
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_*?\[\]!]+", value):
        raise UnitError(f"{value!r} is not a key pattern; expected {expected}")
    return value


EnvPattern = Annotated[str, BeforeValidator(_pattern)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)


def _unique(field: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            raise UnitError(f"{v!r} is listed twice; expected each {field} at most once")
        seen.add(v)
    return values


class Defaults(_Section):
    """What a run gets for every field the request leaves out."""

    network: NetworkName = "none"
    cpus: Cpus = 1.0
    memory: MemoryMiB = 512
    max_pids: Pids = 256
    timeout: Duration = 120.0
    max_output: OutputBytes = 10 * 1024 * 1024
    """Capture cap per stream (head + tail kept, every byte counted)."""
    image: Name = BUILTIN_IMAGE
    workdir: ContainerPath | None = None
    """None: the workspace mount when the workspace is enabled, else /tmp."""
    user: UserText = "1000:1000"


class Ceilings(_Section):
    """The most a request may get; above it the request is rejected or clamped."""

    cpus: Cpus = 2.0
    memory: MemoryMiB = 2048
    max_pids: Pids = 1024
    timeout: Duration = 600.0
    max_output: OutputBytes = 64 * 1024 * 1024


def _egress_rule(value: Any) -> EgressRule:
    try:
        return parse_rule(value)
    except EgressError as e:
        raise UnitError(str(e)) from None


def _rule_yaml(rule: EgressRule) -> Any:
    """The shortest spelling that loads back to the same rule."""
    if rule.domain is not None and rule.ports == (80, 443):
        return rule.domain
    key = "domain" if rule.domain is not None else "cidr"
    return {key: rule.domain if rule.domain is not None else str(rule.cidr), "ports": list(rule.ports)}


EgressRuleText = Annotated[
    EgressRule,
    BeforeValidator(_egress_rule),
    PlainSerializer(_rule_yaml, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "description": "pypi.org, *.pythonhosted.org, host:8080, '*' or a CIDR"},
                {
                    "type": "object",
                    "properties": {
                        "domain": {"type": "string"},
                        "cidr": {"type": "string"},
                        "ports": {"type": "array", "items": {"type": "integer"}},
                    },
                },
            ],
            "description": RULE_EXPECTED,
        }
    ),
]


def _hosts(value: Any) -> Any:
    try:
        return _host_map(value)
    except EgressError as e:
        raise UnitError(str(e)) from None


HostMap = Annotated[
    dict[str, tuple[Any, ...]],
    BeforeValidator(_hosts),
    PlainSerializer(lambda m: {k: [str(a) for a in v] for k, v in m.items()}, when_used="json"),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        }
    ),
]


class Egress(_Section):
    """network=sandbox: where the run's egress proxy may connect (nothing by default).

    See gvisor_mcp/network/egress.py and docs/network.md for the rule syntax.
    """

    allow: tuple[EgressRuleText, ...] = ()
    hosts: HostMap = {}
    """Names the proxy resolves to these addresses itself (internal mirrors)."""
    max_connections: Annotated[int, BeforeValidator(_count(1, 4096))] = 32
    """Connections open at once, per run."""
    max_bytes: Annotated[
        int,
        BeforeValidator(_bounded(parse_bytes, 1024, 1 << 50, format_bytes, "a size")),
        PlainSerializer(format_bytes, return_type=str, when_used="json"),
        _size_schema("bytes"),
    ] = 1 << 30
    """Bytes both ways through the proxy, per run."""
    idle_timeout: Duration = 60.0
    """A connection with no byte either way for this long is closed."""

    def rules(self) -> EgressRules:
        return EgressRules.model_construct(
            allow=self.allow,
            hosts=dict(self.hosts),
            max_connections=self.max_connections,
            max_bytes=self.max_bytes,
            idle_timeout=self.idle_timeout,
        )


class Network(_Section):
    """Which network modes a request may use; `host` only if written here."""

    allowed: tuple[NetworkName, ...] = Field(default=("none",), min_length=1)
    egress: Egress = Egress()

    @field_validator("allowed")
    @classmethod
    def _once(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique("network mode", v)


STORE_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(@sha256:[0-9a-f]{64})?$")
STORE_REF_EXPECTED = "an image store name like agent, optionally pinned as agent@sha256:<64 hex digits>"


def _store_ref(value: Any) -> str:
    if not isinstance(value, str) or not STORE_REF_RE.match(value) or value.split("@")[0] == BUILTIN_IMAGE:
        raise UnitError(f"{value!r} is not a store image; expected {STORE_REF_EXPECTED}")
    return value


StoreRef = Annotated[
    str, BeforeValidator(_store_ref), WithJsonSchema({"type": "string", "pattern": STORE_REF_RE.pattern})
]


class CatalogImage(_Section):
    """One image a request may name: from the server's image store, or a directory."""

    store: StoreRef | None = None
    """An image of the server's store (`gvisor-mcp image ...`), by name (follows rebuilds)
    or pinned to a digest (NAME@sha256:...)."""
    path: HostPath | None = None
    """An unpacked root filesystem directory the operator maintains."""
    writable: StrictBool = False
    """The root is read-only unless true; then writes go to an overlay in the run's
    memory (counted against its memory limit) and vanish with the run."""

    @model_validator(mode="after")
    def _one(self) -> CatalogImage:
        if (self.store is None) == (self.path is None):
            raise UnitError(
                "give exactly one of `store` (an image store name) and `path` (a directory); "
                "expected e.g. {store: agent} or {path: /srv/rootfs/py}"
            )
        return self


def _catalog_entry(value: Any) -> Any:
    if isinstance(value, str):
        return {"path": value}
    if isinstance(value, (dict, CatalogImage)):
        return value
    raise UnitError(
        f"got {type(value).__name__} {value!r}; expected an absolute directory path, "
        "or a mapping like {store: agent} or {store: agent, writable: true}"
    )


def _catalog_out(entry: CatalogImage) -> Any:
    if entry.path is not None and not entry.writable:
        return entry.path  # the short form, as written
    return {k: v for k, v in (("store", entry.store), ("path", entry.path), ("writable", entry.writable)) if v}


CatalogEntry = Annotated[
    CatalogImage,
    BeforeValidator(_catalog_entry),
    PlainSerializer(_catalog_out),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": "^/", "description": "a root filesystem directory (read-only)"},
                {
                    "type": "object",
                    "properties": {
                        "store": {"type": "string", "pattern": STORE_REF_RE.pattern},
                        "path": {"type": "string", "pattern": "^/"},
                        "writable": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            ]
        }
    ),
]


class Images(_Section):
    """Named root filesystems; `host` (the built-in image) is always defined."""

    catalog: dict[ImageName, CatalogEntry] = {}
    """Image name -> a store image ({store: NAME}) or a directory (an absolute path)."""
    allowed: tuple[Name, ...] = Field(default=(BUILTIN_IMAGE,), min_length=1)
    """Names a request may ask for (each must be `host` or in the catalog)."""

    @field_validator("allowed")
    @classmethod
    def _once(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique("image", v)


class Workspace(_Section):
    """A persistent read-write directory mounted into every run.

    The host directory is derived by the server (`<workspace_root>/<tenant>/...`),
    never written in the file and never taken from a request.
    """

    enabled: StrictBool = True
    mount: ContainerPath = "/workspace"
    scope: WorkspaceScope = "session"
    size: WorkspaceMiB = 1024

    @field_validator("mount")
    @classmethod
    def _mount(cls, v: str) -> str:
        if v == "/" or v.split("/")[1] in ("proc", "sys", "dev"):
            raise UnitError(f"{v!r} cannot be a mount point; expected a directory below / outside /proc, /sys and /dev")
        return v


DEFAULT_ENV_DENY: tuple[str, ...] = ("LD_*", "BASH_ENV", "ENV", "BASH_FUNC_*", "SHELLOPTS", "BASHOPTS")


class Env(_Section):
    """Environment variables: fixed ones, and which keys a request may set."""

    set: dict[EnvKey, StrictStr] = {}
    """Always set; a request may not change them."""
    allow: tuple[EnvPattern, ...] = ("*",)
    """fnmatch patterns (case-sensitive) of keys a request may set."""
    deny: tuple[EnvPattern, ...] = DEFAULT_ENV_DENY
    """Patterns never allowed; deny wins over allow."""
    max_vars: Annotated[int, BeforeValidator(_count(0, MAX_ENV))] = 64
    max_bytes: EnvBytes = 64 * 1024
    """Sum over requested variables of len(key) + len(value) + 2."""


FileBytes = Annotated[
    int,
    BeforeValidator(_bounded(parse_bytes, 1024, 64 * 1024 * 1024, format_bytes, "a size")),
    PlainSerializer(format_bytes, return_type=str, when_used="json"),
    _size_schema("bytes"),
]


class Files(_Section):
    """The file tools (read_file, write_file, list_files, delete_file), served
    by the server on the workspace and project directories without a sandbox."""

    max_read: FileBytes = 1024 * 1024
    """Most bytes one read_file call (or one resource read) returns."""
    max_write: FileBytes = 2 * 1024 * 1024
    """Largest content one write_file call accepts (bytes after decoding)."""
    max_list: Annotated[int, BeforeValidator(_count(1, 100_000))] = 1000
    """Most entries one list_files call (or resources/list) returns."""


def _project_path(value: Any) -> str:
    path = _host_path(value, "an absolute host path of a project directory")
    if path == "/" or path.split("/")[1] in ("proc", "sys", "dev"):
        raise UnitError(f"{value!r} cannot be a project; expected a host directory outside /, /proc, /sys and /dev")
    return path


ProjectPath = Annotated[str, BeforeValidator(_project_path), WithJsonSchema({"type": "string", "pattern": "^/"})]


class Project(_Section):
    """A host directory the operator names, mounted into every run.

    Only paths written here (or given to `serve --project`) are ever
    mounted; a request can never name a host path.
    """

    path: ProjectPath
    mount: ContainerPath | None = None
    """Where it appears in the sandbox; left out: /projects/<name>."""
    read_only: StrictBool = True

    @field_validator("mount")
    @classmethod
    def _mount(cls, v: str | None) -> str | None:
        if v is not None and (v == "/" or v.split("/")[1] in ("proc", "sys", "dev")):
            raise UnitError(f"{v!r} cannot be a mount point; expected a directory below / outside /proc, /sys and /dev")
        return v

    def mount_point(self, name: str) -> str:
        return self.mount or f"/projects/{name}"


class Output(_Section):
    """How much of each stream the tool result shows the model (head and tail)."""

    head: ShownBytes = 4096
    tail: ShownBytes = 4096


class Quotas(_Section):
    """Per tenant: runs at once, and runs started per minute."""

    max_concurrent: Annotated[int, BeforeValidator(_count(1, 4096))] = 4
    runs_per_minute: Annotated[int, BeforeValidator(_count(1, 1_000_000))] = 60


MERGED_MAPPINGS = {("env", "set"), ("images", "catalog"), ("network", "egress", "hosts")}
"""Mapping-valued keys a tenant extends key by key; everything else is replaced."""


class Settings(_Section):
    """Everything a tenant's runs are governed by (the file's top level, or a tenant's)."""

    defaults: Defaults = Defaults()
    ceilings: Ceilings = Ceilings()
    network: Network = Network()
    on_exceed: OnExceed = "reject"
    images: Images = Images()
    workspace: Workspace = Workspace()
    env: Env = Env()
    output: Output = Output()
    quotas: Quotas = Quotas()
    files: Files = Files()
    projects: dict[Name, Project] = {}
    """Host directories mounted into every run: name -> path, mount, read_only."""
    foreground_limit: Duration = 45.0
    """How long execute_command waits before returning a still-running handle."""

    # Convenience for the server: flat names for what it enforces itself.
    @property
    def max_concurrent(self) -> int:
        return self.quotas.max_concurrent

    @property
    def runs_per_minute(self) -> int:
        return self.quotas.runs_per_minute

    @property
    def head_bytes(self) -> int:
        return self.output.head

    @property
    def tail_bytes(self) -> int:
        return self.output.tail

    @property
    def default_workdir(self) -> str:
        if self.defaults.workdir is not None:
            return self.defaults.workdir
        return self.workspace.mount if self.workspace.enabled else "/tmp"


class TenantSection(Settings):
    """One tenant: only the keys written here override what it inherits."""

    extends: Name | None = None
    """Inherit from this tenant instead of the top level."""
    allow_above_ceilings: StrictBool = False
    """Must be true for this tenant's ceilings (or network modes) to exceed the top level's."""


class PolicyFile(Settings):
    """The whole file."""

    version: Literal[1]
    tenants: dict[Name, TenantSection] = {}


class TenantSettings(Settings):
    """A tenant's effective settings after inheritance; what resolve() uses."""

    name: str
