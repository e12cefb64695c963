"""`gvisor-mcp token add | list | revoke`: the static bearer tokens of the HTTP transport.

The file API (tokens.py: TokenFile.load/add/revoke/entries, and the default
path <state-dir>/tokens.yaml) is what other commands build on; this module
is only the command line. A running server sees `add` and `revoke` on its
next request (auth.py), no restart or SIGHUP needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("token", help="manage bearer tokens for the HTTP transport")
    tsub = p.add_subparsers(dest="token_command", required=True)

    def common(t: argparse.ArgumentParser) -> None:
        t.add_argument("--tokens", default=None, help="tokens file (default <state-dir>/tokens.yaml)")
        t.add_argument("--state-dir", default=None)

    t = tsub.add_parser("add", help="create a token for TENANT, print it once, store its hash")
    t.add_argument("tenant", nargs="?", default=None)
    t.add_argument("--metrics", action="store_true", help="a token that may read /metrics only")
    t.add_argument("--policy", default=None, help="check TENANT against this policy (default: built-in)")
    common(t)
    t = tsub.add_parser("list", help="list tokens: tenant, created, fingerprint (never the token)")
    common(t)
    t = tsub.add_parser("revoke", help="remove a token by its fingerprint, or all of a tenant's")
    t.add_argument("fingerprint", nargs="?", default=None, help="from `gvisor-mcp token list` (6+ hex digits)")
    t.add_argument("--tenant", default=None, help="revoke every token of TENANT")
    common(t)


def token_main(args: argparse.Namespace) -> int:
    from .tokens import TokenFile, TokenFileError

    path = tokens_path(args)
    try:
        tokens = TokenFile.load(path)
        if args.token_command == "list":
            return _list(tokens)
        if args.token_command == "revoke":
            gone = tokens.revoke(fingerprint=args.fingerprint, tenant=args.tenant)
            for e in gone:
                print(f"revoked {e.fingerprint} ({e.tenant}, created {e.created or '?'})")
            print(
                f"{len(gone)} token(s) removed from {path}; a running server refuses them from its next request",
                file=sys.stderr,
            )
            return 0
        return _add(args, tokens, path)
    except TokenFileError as e:
        return _fail(str(e))


def tokens_path(args: argparse.Namespace) -> Path:
    from .paths import default_state_dir

    if args.tokens:
        return Path(args.tokens)
    return (Path(args.state_dir) if args.state_dir else default_state_dir()) / "tokens.yaml"


def _list(tokens: object) -> int:
    entries = tokens.entries  # type: ignore[attr-defined]
    if not entries:
        print(
            f"no tokens in {tokens.path}; create one with `gvisor-mcp token add TENANT`",  # type: ignore[attr-defined]
            file=sys.stderr,
        )
        return 0
    width = max(len("TENANT"), *(len(e.tenant) for e in entries))
    print(f"{'TENANT':<{width}}  {'CREATED':<25}  FINGERPRINT")
    for e in entries:
        print(f"{e.tenant:<{width}}  {e.created or '-':<25}  {e.fingerprint}")
    return 0


def _add(args: argparse.Namespace, tokens: object, path: Path) -> int:
    from .policy import load, load_default
    from .tokens import METRICS_ROLE

    if args.metrics == bool(args.tenant):
        return _fail("give either a TENANT or --metrics")
    if args.tenant:
        try:
            (load(args.policy) if args.policy else load_default()).tenant(args.tenant)
        except Exception as e:
            return _fail(str(e))
    token = tokens.add(METRICS_ROLE if args.metrics else args.tenant)  # type: ignore[attr-defined]
    entry = tokens.entries[-1]  # type: ignore[attr-defined]
    print(token)
    print(
        f"stored its SHA-256 in {path} (fingerprint {entry.fingerprint}); this token is not shown again",
        file=sys.stderr,
    )
    return 0


def _fail(msg: str, code: int = 2) -> int:
    print(f"gvisor-mcp: {msg}", file=sys.stderr)
    return code
