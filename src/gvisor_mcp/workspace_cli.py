"""`gvisor-mcp workspace list | du | rm`: the operator's view of kept workspaces.

Workspaces are identified as they lie under `<state-dir>/workspaces`:
`TENANT/named/NAME` (stdio's `--workspace NAME`), `TENANT/shared` (scope
tenant) and `TENANT/sessions/ID` (a session's, or one an agent created;
removed by the server itself when the session ends or at its next start).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import workspace as _workspace
from .paths import default_state_dir
from .policy.units import format_bytes


@dataclass(frozen=True)
class Found:
    id: str
    mountpoint: Path
    image: Path
    size: int
    """The image's apparent size: the workspace's limit."""
    on_disk: int
    """Bytes the sparse image really takes on the host."""
    mounted: bool
    in_use: bool
    used: int | None
    """Bytes used inside, when mounted."""


def find(root: Path) -> list[Found]:
    images = root / _workspace.IMAGES_DIR
    if not images.is_dir():
        return []
    mounted = {backing: mp for mp, backing in _workspace.loop_mounts()}
    out = []
    for image in sorted(images.rglob("*" + _workspace.IMAGE_SUFFIX)):
        rel = image.relative_to(images)
        ident = str(rel.parent / rel.name[: -len(_workspace.IMAGE_SUFFIX)])
        mountpoint = root / ident
        st = image.stat()
        used = None
        is_mounted = mounted.get(image) == mountpoint
        if is_mounted:
            vfs = os.statvfs(mountpoint)
            used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        out.append(
            Found(ident, mountpoint, image, st.st_size, st.st_blocks * 512, is_mounted, _workspace.in_use(image), used)
        )
    return out


def _state(args: argparse.Namespace) -> Path:
    return (Path(args.state_dir) if args.state_dir else default_state_dir()) / "workspaces"


def workspace_main(args: argparse.Namespace) -> int:
    root = _state(args)
    if args.workspace_command == "list":
        found = find(root)
        if not found:
            print(f"no workspaces under {root}")
            return 0
        print(f"{'WORKSPACE':40} {'SIZE':>9} {'STATE':8}")
        for f in found:
            state = "in use" if f.in_use else ("mounted" if f.mounted else "idle")
            print(f"{f.id:40} {format_bytes(f.size):>9} {state:8}")
        return 0
    if args.workspace_command == "du":
        found = find(root)
        total = 0
        print(f"{'WORKSPACE':40} {'ON DISK':>10} {'USED':>10} {'SIZE':>9}")
        for f in found:
            total += f.on_disk
            used = format_bytes(f.used) if f.used is not None else "-"
            print(f"{f.id:40} {format_bytes(f.on_disk):>10} {used:>10} {format_bytes(f.size):>9}")
        print(f"{'total':40} {format_bytes(total):>10}")
        return 0
    # rm
    status = 0
    known = {f.id: f for f in find(root)}
    for ident in args.ids:
        entry = known.get(ident.strip("/"))
        if entry is None:
            print(
                f"gvisor-mcp: no workspace {ident!r} under {root}; `gvisor-mcp workspace list` shows "
                "them (e.g. default/named/default)",
                file=sys.stderr,
            )
            status = 1
            continue
        if not _workspace.remove_unused(root, entry.mountpoint):
            print(
                f"gvisor-mcp: workspace {entry.id} is in use by a running server; stop it and try again",
                file=sys.stderr,
            )
            status = 1
            continue
        print(f"removed {entry.id} ({format_bytes(entry.on_disk)} freed)")
    return status


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("workspace", help="list, measure or remove workspaces (kept across restarts)")
    wsub = p.add_subparsers(dest="workspace_command", required=True)
    for name, text in (
        ("list", "every workspace: size limit and whether a server uses it"),
        ("du", "host disk space each workspace image takes, and what is used inside"),
    ):
        w = wsub.add_parser(name, help=text)
        w.add_argument("--state-dir", default=None)
    w = wsub.add_parser("rm", help="delete workspaces and their files (refused while a server uses one)")
    w.add_argument("ids", nargs="+", metavar="WORKSPACE", help="as `list` shows it, e.g. default/named/default")
    w.add_argument("--state-dir", default=None)
