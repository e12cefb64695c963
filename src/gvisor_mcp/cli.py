"""`gvisor-mcp serve | run | doctor | cleanup | agent | connect | token | workspace | policy ... | image ...`.

Why over ~400 lines: every command's flags are declared here, one argparse
line (and its help text) per flag, and turned into config in one place; the
shared options and usage errors live in cli_args.py, the bridge in
connect.py, run's status line in runview.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import anyio

from . import logs
from .cli_args import LOG_LEVEL_ENV, Parser, UsageError, choose_level, fail_usage, split_leading
from .config import HttpOptions, ServeConfig
from .images.cli import image_main
from .network import EgressError, EgressRules, NetworkConfig, NetworkService
from .oauth import OAuthOptions, options_from_args
from .paths import default_state_dir
from .policy import PolicyError, UnknownTenant, load, load_default
from .policy.cli import policy_main
from .sandbox import (
    ContainerOptions,
    InvalidOptionsError,
    Manager,
    ManagerConfig,
    NetworkMode,
    ResourceSpec,
    RunscError,
    SandboxError,
    UserSpec,
)
from .sandbox.doctor import doctor
from .sandbox.reaper import describe
from .token_cli import add_parser as add_token_parser
from .token_cli import token_main
from .tokens import TokenFile
from .version import package_version
from .workspace_cli import add_parser as add_workspace_parser
from .workspace_cli import workspace_main


def _manager_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runsc", default="runsc", help="runsc binary (default: from PATH)")
    p.add_argument("--platform", default="systrap", choices=["systrap", "ptrace", "kvm"])
    p.add_argument(
        "--state-root",
        default="/run/gvisor-mcp",
        help="where runsc state and bundles live (default: /run/gvisor-mcp)",
    )
    p.add_argument(
        "--cgroup-parent",
        default="gvisor-mcp",
        help="cgroup directory that holds one leaf per run (default: gvisor-mcp)",
    )
    p.add_argument("--max-concurrent", type=int, default=8, help="sandboxes running at once, all callers (default 8)")


def manager_config(args: argparse.Namespace, **kw: object) -> ManagerConfig:
    return ManagerConfig(
        runsc_path=args.runsc,
        platform=args.platform,
        bundle_base_dir=os.path.join(args.state_root, "bundles"),
        runsc_root=os.path.join(args.state_root, "runsc"),
        cgroup_parent=args.cgroup_parent,
        max_concurrent_containers=args.max_concurrent,
        **kw,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: at least 1")
    return value


def _seconds_or_never(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is not allowed: a number of seconds, or 0 for never")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gvisor-mcp",
        description="Run shell commands for LLM agents, each in a fresh gVisor sandbox.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help=f"{', '.join(logs.LEVELS)} (default: ${LOG_LEVEL_ENV}, else INFO for serve, WARNING otherwise); "
        "also accepted after the command",
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run one command in a fresh sandbox and stream its output")
    _manager_args(p)
    p.add_argument("--memory-mb", type=int, default=0, help="memory limit in MiB (default 512)")
    p.add_argument("--cpus", type=float, default=0.0, help="CPU cores (default: no limit)")
    p.add_argument("--timeout", type=float, default=0.0, help="seconds (default 120)")
    p.add_argument("--max-pids", type=int, default=0, help="processes (default 1024)")
    p.add_argument("--network", default="none", help="none | host | sandbox (default none)")
    p.add_argument(
        "--user",
        default=None,
        help="UID[:GID] inside the sandbox (default: the policy's defaults.user, 1000:1000 in the built-in policy)",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="take the default --user from this policy file (default: the built-in policy); "
        "its other settings do not apply to run",
    )
    p.add_argument("--tenant", default="default", help="with --policy: the tenant whose defaults.user applies")
    p.add_argument("--workdir", default="/", help="working directory inside the sandbox")
    p.add_argument("--rootfs", default=None, help="host directory to use as root (default: built-in image)")
    p.add_argument("--read-only", action="store_true", help="make the root filesystem read-only")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--egress",
        action="append",
        default=[],
        metavar="RULE",
        help="network sandbox: allow this destination through the egress proxy (repeatable; "
        "pypi.org, *.pythonhosted.org, host:PORT, a CIDR); default: nothing",
    )
    p.add_argument(
        "--egress-host",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="network sandbox: the proxy resolves NAME to ADDRESS itself (repeatable)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    p = sub.add_parser("doctor", help="check that this host can run sandboxes")
    _manager_args(p)

    p = sub.add_parser("cleanup", help="remove containers, cgroups and bundles left by dead servers")
    _manager_args(p)

    p = sub.add_parser("serve", help="serve MCP on stdio (default) or streamable HTTP")
    _manager_args(p)
    p.add_argument("--policy", default=None, help="policy file (default: the built-in policy)")
    p.add_argument("--tenant", default=None, help="stdio: the policy tenant this process serves")
    p.add_argument("--state-dir", default=None, help="results, audit log, workspaces, tokens")
    p.add_argument(
        "--pool-size",
        type=int,
        default=2,
        metavar="N",
        help="sandboxes kept booted for the default request shape (default 2; 0 disables the warm pool)",
    )
    p.add_argument(
        "--pool-freeze-after",
        type=_seconds_or_never,
        default=1.0,
        metavar="SECONDS",
        help="freeze a pooled sandbox left unclaimed this long; it is thawed when claimed "
        "(default 1; 0: never freeze; an idle one costs ~40-60 ms of CPU per second)",
    )
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="http: address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8765, help="http: port (default 8765)")
    p.add_argument("--tokens", default=None, help="http: tokens file (default <state-dir>/tokens.yaml)")
    p.add_argument("--tls-cert", default=None, help="http: TLS certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="http: TLS private key (PEM)")
    p.add_argument(
        "--behind-tls-proxy",
        action="store_true",
        help="http: allow a non-loopback bind without --tls-cert because a proxy in front terminates TLS",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="http: extra Host header value to accept (the bind address is always accepted)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="http: extra Origin to accept, e.g. https://app.example",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="http: request body limit")
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="http: a request body must arrive within this (default 30)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="http: a request head must arrive within this; also the idle limit of a kept-alive "
        "connection (default 10)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="http: connections open at once; more wait in the listen backlog (default 512)",
    )
    p.add_argument("--max-sessions", type=int, default=256, help="http: open MCP sessions, all tenants (default 256)")
    p.add_argument(
        "--max-sessions-per-tenant", type=int, default=16, help="http: open MCP sessions of one tenant (default 16)"
    )
    p.add_argument(
        "--session-idle-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="http: a session with no request for this long ends; its workspace is freed (default 1800)",
    )
    p.add_argument(
        "--max-workspaces",
        type=_positive_int,
        default=128,
        help="workspace images mounted at once, all tenants (default 128)",
    )
    p.add_argument(
        "--max-workspaces-per-tenant",
        type=_positive_int,
        default=16,
        help="workspace images mounted at once for one tenant (default 16)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=0, help="stdio: also serve Prometheus /metrics on 127.0.0.1:PORT"
    )
    p.add_argument(
        "--egress-host",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="network=sandbox: the egress proxy resolves NAME to ADDRESS itself (repeatable)",
    )
    p.add_argument(
        "--no-system-dns",
        action="store_true",
        help="network=sandbox: the egress proxy resolves only --egress-host names and the "
        "policy's network.egress.hosts, never through DNS",
    )
    p.add_argument(
        "--workspace",
        default=None,
        metavar="NAME",
        help="stdio: the named workspace to use (default 'default'); kept across restarts",
    )
    p.add_argument(
        "--project",
        default=None,
        metavar="DIR",
        help="stdio: mount DIR read-write at /project in every sandbox (and the file tools)",
    )
    p.add_argument(
        "--audit-max-mb",
        type=int,
        default=64,
        metavar="MB",
        help="rotate <state-dir>/audit.jsonl past this size (default 64)",
    )
    p.add_argument(
        "--audit-keep",
        type=int,
        default=4,
        metavar="N",
        help="rotated audit files kept: audit.jsonl.1 .. .N (default 4)",
    )
    p.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="where commands run: this host (default) or HostAgents on a Ray cluster (docs/scale-out.md)",
    )
    p.add_argument("--ray-address", default=None, help="ray: the head node's GCS address HOST:PORT")
    p.add_argument(
        "--expect-runsc-version",
        default=None,
        help="ray: agents must report this `runsc --version` line (default: this host's runsc)",
    )

    from .oauth import add_arguments as add_oauth_arguments

    add_oauth_arguments(p)

    p = sub.add_parser("agent", help="run this host's HostAgent on a Ray cluster (docs/scale-out.md)")
    _manager_args(p)
    p.add_argument("--ray-address", required=True, help="the head node's GCS address HOST:PORT")
    p.add_argument("--host-name", required=True, help="this host's name: its node has resource gvisor_mcp_host_<name>")
    p.add_argument("--state-dir", default="/var/lib/gvisor-mcp-agent", help="output of runs and workspaces")
    p.add_argument("--pool-size", type=int, default=2, help="warm sandboxes per front-end template (0: none)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME=DIR|NAME=store:REF",
        help="an image this host runs by name (repeatable; the built-in 'host' always)",
    )
    p.add_argument(
        "--sandbox-network",
        action="store_true",
        help="also run network=sandbox (per-run namespace and egress proxy; Ray's nodes and ports are always refused)",
    )
    p.add_argument(
        "--egress",
        action="append",
        default=[],
        metavar="RULE",
        help="network=sandbox: the widest egress allowlist this host grants (repeatable; none by default)",
    )

    add_workspace_parser(sub)

    add_token_parser(sub)

    p = sub.add_parser(
        "connect",
        help="stdio MCP server for a user's client, forwarding to a gvisor-mcp HTTP server "
        "(no root needed; see README)",
    )
    p.add_argument("url", metavar="URL", help="the server's MCP endpoint, like http://127.0.0.1:8765/mcp")
    p.add_argument(
        "--token-file",
        required=True,
        metavar="FILE",
        help="file holding the bearer token `gvisor-mcp token add TENANT` printed (chmod 600)",
    )
    p.add_argument(
        "--ca-file",
        default=None,
        metavar="FILE",
        help="https: trust only this CA (PEM) for the server's certificate, e.g. the private CA that signed "
        "its --tls-cert (default: the system's CAs)",
    )

    sub.add_parser("policy", help="check, show or describe a policy file", add_help=False)
    sub.add_parser("image", help="build, pull, import, list, inspect or remove images", add_help=False)
    for name, command in sub.choices.items():
        if name not in ("policy", "image"):  # these parse their own arguments
            command.add_argument("--log-level", metavar="LEVEL", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(_main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    """Options before the command first (cli_args.py), then the command; usage errors are one line."""
    try:
        leading, rest = split_leading(argv)
        if leading.show_version:
            print(f"gvisor-mcp {package_version()}")
            return 0
        # `policy` and `image` own their own argument parsing.
        if rest and rest[0] in ("policy", "image"):
            logs.configure(choose_level(leading.log_level, rest[0]), json=True)
            return policy_main(rest[1:]) if rest[0] == "policy" else image_main(rest[1:])
        args, extra = build_parser().parse_known_args(rest)
        if extra:
            where = " ".join(["gvisor-mcp", args.cmd] + ([args.token_command] if args.cmd == "token" else []))
            raise UsageError(f"{where}: unrecognized arguments: {' '.join(extra)}; see `{where} --help`")
        logs.configure(choose_level(getattr(args, "log_level", None) or leading.log_level, args.cmd), json=True)
    except UsageError as e:
        return fail_usage(e)
    handler = {
        "run": cmd_run,
        "doctor": cmd_doctor,
        "cleanup": cmd_cleanup,
        "serve": cmd_serve,
        "token": cmd_token,
        "workspace": cmd_workspace,
        "connect": cmd_connect,
        "agent": cmd_agent,
    }
    return handler[args.cmd](args)


def _fail(msg: str, code: int = 2) -> int:
    print(f"gvisor-mcp: {msg}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            return _fail(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    try:
        network = NetworkMode(args.network)
    except ValueError:
        return _fail(f"--network {args.network!r}: expected one of none, sandbox, host")
    try:
        egress = EgressRules(allow=args.egress) if network is NetworkMode.SANDBOX else None
        net_config = network_config(args)
    except (EgressError, ValueError) as e:
        return _fail(_clean_validation(e))
    try:
        user = UserSpec.parse(args.user or _policy_user(args.policy, args.tenant))
    except (InvalidOptionsError, PolicyError, UnknownTenant) as e:
        return _fail(_clean_validation(e) if isinstance(e, InvalidOptionsError) else str(e))
    from .runview import RunView

    view = RunView(sys.stdout.buffer, sys.stderr.buffer)
    try:
        options = ContainerOptions(
            command=command,
            workdir=args.workdir,
            env=env or None,
            rootfs=args.rootfs,
            network=network,
            egress=egress,
            user=user,
            read_only_rootfs=args.read_only,
            resources=ResourceSpec(
                cpus=args.cpus,
                memory_mb=args.memory_mb,
                max_pids=args.max_pids,
                timeout=args.timeout,
            ),
            stdin=None if sys.stdin is None or sys.stdin.isatty() else _stdin_bytes(),
            stdout_writer=view.writer("stdout"),
            stderr_writer=view.writer("stderr"),
        )
    except (ValueError, InvalidOptionsError) as e:
        return _fail(_clean_validation(e))

    async def go() -> int:
        if network is not NetworkMode.SANDBOX:
            return await run_with(None)
        async with NetworkService(net_config) as net:
            return await run_with(net)

    async def run_with(net: NetworkService | None) -> int:
        async with Manager(manager_config(args), network=net) as manager:
            try:
                result = await view.while_running(lambda: manager.run(options))
            except InvalidOptionsError as e:
                print(f"gvisor-mcp: {e}", file=sys.stderr)
                return 2
            except (SandboxError, RunscError) as e:
                print(f"gvisor-mcp: sandbox failure: {e}", file=sys.stderr)
                return 125
        print(f"gvisor-mcp: {result.summary()}", file=sys.stderr)
        for d in (result.network or {}).get("destinations", []):
            print(
                f"gvisor-mcp: network: {d['verdict']} {d['destination']}"
                + (f" ({d['reason']})" if d.get("reason") else ""),
                file=sys.stderr,
            )
        return result.exit_code if 0 <= result.exit_code < 256 else 125

    try:
        return anyio.run(go)
    except (SandboxError, RunscError) as e:
        return _fail(str(e), 125)
    except KeyboardInterrupt:  # Ctrl-C: asyncio cancelled the run, and the Manager removed its sandbox
        return _fail("interrupted; the command was stopped and its sandbox removed", 130)


def _policy_user(path: str | None, tenant: str) -> str:
    """The user a policy runs commands as: `run` never defaults to root when the server would not."""
    return (load(path) if path else load_default()).tenant(tenant).defaults.user


def _stdin_bytes() -> bytes | None:
    data = sys.stdin.buffer.read()
    return data or None


def _clean_validation(e: Exception) -> str:
    """pydantic's text around our own messages is noise for a CLI user."""
    found = re.findall(r"Value error, (.*?)(?: \[type=|\n|$)", str(e))
    return "; ".join(found) if found else str(e)


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = anyio.run(doctor, manager_config(args))
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    async def go() -> list[dict]:
        async with Manager(manager_config(args)) as manager:
            return await manager.reap_stale()

    report = anyio.run(go)
    for entry in report:
        print(describe(entry))
    print(f"{len(report)} stale container(s) removed")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """`gvisor-mcp token add | list | revoke` (token_cli.py)."""
    return token_main(args)


def cmd_connect(args: argparse.Namespace) -> int:
    from .connect import connect_main

    return connect_main(args.url, args.token_file, args.ca_file)


def cmd_workspace(args: argparse.Namespace) -> int:
    return workspace_main(args)


def network_config(args: argparse.Namespace) -> NetworkConfig:
    """--egress-host NAME=ADDR (repeatable) and --no-system-dns."""
    hosts: dict[str, list[str]] = {}
    for item in getattr(args, "egress_host", None) or []:
        name, sep, addr = item.partition("=")
        if not sep:
            raise ValueError(f"--egress-host {item!r}: expected NAME=ADDRESS, like mirror.internal=10.0.0.5")
        hosts.setdefault(name.strip(), []).append(addr.strip())
    return NetworkConfig(hosts=hosts, system_dns=not getattr(args, "no_system_dns", False))


def _oauth_options(args: argparse.Namespace) -> OAuthOptions | None:
    """OAuth resource-server mode when --oauth-issuer is given (oauth.py)."""
    scheme = "https" if args.tls_cert or args.behind_tls_proxy else "http"
    return options_from_args(args, scheme=scheme, host=args.host, port=args.port)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """`serve`'s flags as a ServeConfig; ValueError names the flag that cannot be used."""
    if args.backend == "ray" and not args.ray_address:
        raise ValueError("--backend ray needs --ray-address HOST:PORT (the head node's GCS address)")
    http = None
    if args.transport == "http":
        http = HttpOptions(
            host=args.host,
            port=args.port,
            tokens_path=args.tokens or str(Path(args.state_dir or default_state_dir()) / "tokens.yaml"),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            behind_tls_proxy=args.behind_tls_proxy,
            allowed_hosts=tuple(args.allowed_host),
            allowed_origins=tuple(args.allowed_origin),
            max_body_bytes=args.max_body_bytes,
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_connections=args.max_connections,
            session_idle_timeout=args.session_idle_timeout,
            max_sessions=args.max_sessions,
            max_sessions_per_tenant=args.max_sessions_per_tenant,
            oauth=_oauth_options(args),
        )
        TokenFile.load(http.tokens_path)  # unreadable or invalid: one clear line now, not at the first request
    return ServeConfig(
        transport=args.transport,
        tenant=args.tenant or "default",
        policy_path=args.policy,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        manager=manager_config(args, pool_freeze_after=args.pool_freeze_after),
        pool_size=args.pool_size,
        metrics_port=args.metrics_port,
        workspace=args.workspace,
        project_dir=args.project,
        max_workspaces=args.max_workspaces,
        max_workspaces_per_tenant=args.max_workspaces_per_tenant,
        network=network_config(args),
        audit_max_bytes=args.audit_max_mb << 20,
        audit_keep=args.audit_keep,
        http=http,
        backend=args.backend,
        ray_address=args.ray_address,
        expect_runsc_version=args.expect_runsc_version,
    )


def cmd_agent(args: argparse.Namespace) -> int:
    # Lazy: ray is an optional extra; only the agent command (and serve --backend ray) import it.
    from .cluster.agent_main import agent_main

    return agent_main(args, manager_config(args))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = serve_config(args)
    except ValueError as e:
        return _fail(_clean_validation(e))
    # The transports import the MCP SDK and Granian (about a second); the
    # other commands (run, doctor, token...) do not pay for it.
    if config.transport == "http":
        from . import http

        return http.serve(config)
    from . import stdio

    return stdio.serve(config)
