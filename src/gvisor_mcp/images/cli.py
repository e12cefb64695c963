"""`gvisor-mcp image build | pull | import | list | inspect | tag | rm | prune`.

Wired into the main CLI as `image_main(argv)`. Results go to stdout,
progress and errors to stderr. Exit status: 0 ok, 1 the operation failed
or was refused (the store is unchanged), 2 usage.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from ..cli_args import Parser, UsageError
from ..policy.cli import image_store
from ..policy.units import UnitError, format_bytes, parse_bytes
from .builders import Recipe, build, default_name, import_file, load_recipe, make_recipe, pull
from .errors import ImageError
from .store import StoredImage
from .unpack import DEFAULT_MAX_BYTES, UnpackLimits, human_size


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gvisor-mcp image",
        description="Manage the image store: root filesystems runs can use (policy images.catalog).",
    )
    sub = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser, limits: bool = False) -> None:
        p.add_argument(
            "--state-dir",
            default=None,
            help="the server's state directory; images live in <state-dir>/images (default: the same as `serve`)",
        )
        if limits:
            p.add_argument(
                "--max-size",
                default=format_bytes(DEFAULT_MAX_BYTES),
                metavar="SIZE",
                help="refuse archives and images larger than this, e.g. 2GiB (default %(default)s)",
            )

    p = sub.add_parser("build", help="build a Debian image with mmdebstrap from the host's apt sources")
    p.add_argument("name")
    p.add_argument("--packages", default="", metavar="P1,P2,...", help="packages to install")
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="YAML file with packages (list), suite, variant; --packages adds to it",
    )
    p.add_argument("--suite", default=None, help="Debian suite (default: the host's release)")
    p.add_argument("--variant", default=None, help="mmdebstrap variant (default apt)")
    common(p, limits=True)

    p = sub.add_parser("pull", help="pull an image from an OCI registry (skopeo)")
    p.add_argument("ref", metavar="REF", help="REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    p.add_argument("--name", default=None, help="store name (default: the repository's last part)")
    p.add_argument(
        "--insecure", action="store_true", help="allow plain HTTP and unverified TLS (e.g. a registry on 127.0.0.1)"
    )
    p.add_argument("--authfile", default=None, help="registry credentials (containers-auth.json)")
    common(p, limits=True)

    p = sub.add_parser("import", help="import a `docker save` tarball, an OCI archive or an OCI layout directory")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", default=None, help="store name (default: the file's name)")
    common(p, limits=True)

    p = sub.add_parser("list", help="list images")
    p.add_argument("--json", action="store_true")
    common(p)

    p = sub.add_parser("inspect", help="show an image: digest, size, source, created, packages (JSON)")
    p.add_argument("ref", metavar="NAME|sha256:DIGEST")
    common(p)

    p = sub.add_parser("tag", help="point NAME at the image REF names (e.g. to roll back to a digest)")
    p.add_argument("ref", metavar="NAME|sha256:DIGEST")
    p.add_argument("name", metavar="NAME")
    common(p)

    p = sub.add_parser("rm", help="remove names (and their images), refused while in use")
    p.add_argument("refs", nargs="+", metavar="NAME|sha256:DIGEST")
    common(p)

    p = sub.add_parser("prune", help="remove images no name points at and nothing uses")
    common(p)
    return parser


def _limits(args: argparse.Namespace) -> UnpackLimits:
    try:
        size = parse_bytes(args.max_size)
    except UnitError as e:
        raise ImageError(f"--max-size {args.max_size!r}: {e}") from None
    if size < 1024 * 1024:
        raise ImageError(f"--max-size {args.max_size!r}: at least 1MiB")
    return UnpackLimits(max_bytes=size)


def _line(image: StoredImage) -> str:
    names = ",".join(image.names) or "<none>"
    src = image.source
    origin = (
        src.get("ref")
        or src.get("file")
        or (
            f"{src.get('suite')}/{src.get('variant')} +{len(src.get('packages') or [])} packages"
            if src.get("kind") == "build"
            else ""
        )
    )
    return f"{names:<24} {image.short:<12} {human_size(image.size):>10}  {image.created:<25} {src.get('kind', '?')}: {origin}"


def image_main(argv: list[str], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2

    def log(text: str) -> None:
        err.write(f"image: {text}\n")
        err.flush()

    _interrupt_on_term()
    try:
        store = image_store(args.state_dir)
        if args.action == "build":
            recipe = load_recipe(args.recipe) if args.recipe else Recipe()
            extra = [p.strip() for p in args.packages.replace(" ", ",").split(",") if p.strip()]
            data = recipe.model_dump()
            data["packages"] = [*recipe.packages, *extra]
            if args.suite:
                data["suite"] = args.suite
            if args.variant:
                data["variant"] = args.variant
            recipe = make_recipe(data, "--packages/--suite/--variant")
            image = build(store, args.name, recipe, limits=_limits(args), log=log)
        elif args.action == "pull":
            image = pull(
                store,
                args.ref,
                args.name or default_name(args.ref),
                limits=_limits(args),
                insecure=args.insecure,
                authfile=args.authfile,
                log=log,
            )
        elif args.action == "import":
            image = import_file(store, args.file, args.name or _file_name(args.file), limits=_limits(args), log=log)
        elif args.action == "tag":
            image = store.tag(args.ref, args.name)
        elif args.action == "list":
            images = store.list()
            if args.json:
                out.write(json.dumps([_public(i) for i in images], indent=2) + "\n")
            else:
                out.write(f"{'NAME':<24} {'DIGEST':<12} {'SIZE':>10}  {'CREATED':<25} SOURCE\n")
                for image in images:
                    out.write(_line(image) + "\n")
            return 0
        elif args.action == "inspect":
            out.write(json.dumps(_public(store.get(args.ref)), indent=2) + "\n")
            return 0
        elif args.action == "rm":
            status = 0
            for ref in args.refs:
                try:
                    image, deleted = store.remove(ref)
                except ImageError as e:
                    err.write(f"gvisor-mcp image rm: {e}\n")
                    status = 1
                    continue
                out.write(
                    f"removed {ref}"
                    + (
                        f" ({image.digest}, {human_size(image.size)} freed)"
                        if deleted
                        else f" (its image {image.short} keeps its other names)"
                    )
                    + "\n"
                )
            return status
        elif args.action == "prune":
            removed = store.prune()
            for image in removed:
                out.write(f"removed {image.digest} ({human_size(image.size)})\n")
            out.write(f"{len(removed)} unnamed image(s) removed\n")
            return 0
        else:  # pragma: no cover - argparse refuses others
            return 2
    except ImageError as e:
        err.write(f"gvisor-mcp image {args.action}: {e}\n")
        return 1
    except KeyboardInterrupt:
        err.write(
            f"gvisor-mcp image {args.action}: interrupted; its tools were stopped and nothing was added to the store\n"
        )
        return 130
    except OSError as e:
        err.write(f"gvisor-mcp image {args.action}: {_os_error(e)}\n")
        return 1
    out.write(json.dumps(_public(image), indent=2) + "\n")
    return 0


def _interrupt_on_term() -> None:
    """SIGTERM and SIGHUP end a build, pull or import like Ctrl-C does.

    By default they would kill this process outright, and the tool it runs
    (mmdebstrap in its own session, skopeo) would be left behind with a
    half-written work directory. As KeyboardInterrupt they unwind through the
    builders' cleanup, which stops the tool's process group and removes the
    work directory.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _file_name(path: str) -> str:
    """`/x/tool-1.2.tar` -> `tool-1.2`; `./layout/` -> `layout`."""
    name = Path(path).resolve().name
    for suffix in (".tar", ".oci"):
        name = name.removesuffix(suffix)
    return default_name(name)


def _os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return (
            f"the disk is full ({e.strerror}: {e.filename or ''}); nothing was added to the store. "
            "Free space (or use a larger --state-dir) and try again"
        )
    return f"{e.strerror or e} ({e.filename or ''}); nothing was added to the store"


def _public(image: StoredImage) -> dict:
    data = image.model_dump(mode="json")
    data["rootfs"] = image.rootfs
    data.pop("path", None)
    return data
