"""`gvisor-mcp policy check | show | schema`: let operators see what a file means.

Wired into the main CLI as `policy_main(argv)`; results go to stdout, errors
and warnings to stderr. Exit status: 0 ok (warnings included), 1 invalid
policy / unknown tenant, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..cli_args import Parser, UsageError
from ..images.store import ImageStore
from ..paths import default_state_dir
from .errors import PolicyError, UnknownTenant
from .fairness import DEFAULT_CAPACITY, capacity_warnings
from .loader import Policy, load, load_default
from .model import DEFAULT_TENANT, PolicyFile, Settings


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gvisor-mcp policy", description="Check, show or describe a policy file.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("check", help="validate policy files; print every problem with its line")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--no-path-checks",
        action="store_true",
        help="do not require image directories and store images to exist (checking a file for another machine)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="the server's state directory, whose image store holds the catalog's store images "
        "(default: the same as `serve`)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=DEFAULT_CAPACITY,
        metavar="N",
        help="the capacity of the server that will serve it (serve --max-concurrent; default %(default)s): "
        "warn about quotas that reach it",
    )
    p = sub.add_parser("show", help="print a tenant's effective policy (after inheritance) as YAML")
    p.add_argument("--policy", metavar="FILE", help="policy file (default: the built-in policy)")
    p.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant name (default: %(default)s)")
    p.add_argument("--no-path-checks", action="store_true", help=argparse.SUPPRESS)
    sub.add_parser("schema", help="print the JSON Schema of policy files (for editors)")
    return parser


def effective_yaml(policy: Policy, tenant: str) -> str:
    """A tenant's effective settings as a standalone policy file (loadable as is)."""
    settings = policy.tenant(tenant)
    data: dict[str, Any] = {"version": 1}
    data.update(settings.model_dump(mode="json", include=set(Settings.model_fields)))
    if data["defaults"].get("workdir") is None:
        del data["defaults"]["workdir"]
    header = f"# Effective policy of tenant {tenant!r}\n# from {policy.source} (sha256 {policy.sha256})\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def schema() -> dict[str, Any]:
    """JSON Schema of the policy file."""
    out = PolicyFile.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gvisor-mcp policy",
        **out,
    }


def image_store(state_dir: str | None) -> ImageStore:
    """The image store `serve --state-dir` would use."""
    return ImageStore((Path(state_dir) if state_dir else default_state_dir()) / "images")


def policy_main(argv: list[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run `gvisor-mcp policy ...`; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except SystemExit as e:  # argparse already printed usage / help
        return int(e.code) if isinstance(e.code, int) else 2

    if args.action == "schema":
        out.write(json.dumps(schema(), indent=2) + "\n")
        return 0

    if args.action == "check":
        status = 0
        images = None if args.no_path_checks else image_store(args.state_dir)
        for name in args.files:
            try:
                policy = load(name, check_paths=not args.no_path_checks, images=images)
            except PolicyError as e:
                err.write(f"{e}\n")
                status = 1
                continue
            out.write(f"{name}: ok (tenants: {', '.join(policy.tenant_names)}; sha256 {policy.sha256})\n")
            for warning in policy.warnings:
                err.write(f"{warning}\n")
            for capacity in capacity_warnings(policy, args.max_concurrent):
                err.write(f"{name}: warning: {capacity}\n")
        return status

    try:
        policy = load(args.policy, check_paths=not args.no_path_checks) if args.policy else load_default()
        out.write(effective_yaml(policy, args.tenant))
    except (PolicyError, UnknownTenant) as e:
        err.write(f"{e}\n")
        return 1
    return 0


__all__ = ["effective_yaml", "policy_main", "schema"]
