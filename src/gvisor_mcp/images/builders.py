"""The three ways an image comes into the store: build, pull, import.

- build: `mmdebstrap` installs Debian packages from the host's own apt
  sources (sources.py) and writes a tar to its stdout, which the Unpacker
  reads as it comes (no second copy on disk);
- pull: `skopeo copy docker://REF` into an OCI layout in the work directory;
- import: `skopeo copy` from a docker-save tarball, an OCI archive or an OCI
  layout directory.

skopeo does the transport and checks every blob's digest; we read the
layout it wrote and unpack it ourselves (oci.py, unpack.py), so every way
in goes through the same hostile-archive rules and size limits, and every
failure leaves the store as it was (store.work()).

Why over ~400 lines: the three ways in share the recipe model, the tools'
environment, the stop/wait of a tool's process group and the failure texts
(full disk, missing package, registry errors); split apart, those texts
would drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import oci, sources
from .errors import ImageError
from .store import ImageStore, StoredImage, Work, check_name
from .unpack import Unpacker, UnpackError, UnpackLimits, human_size
from .watch import DiskWatch, term_with_parent

Log = Callable[[str], None]

PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+:~-]+)?$")
VARIANTS = ("essential", "apt", "required", "minbase", "buildd", "important", "standard")
TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
INSPECT_TIMEOUT = "120s"
COPY_TIMEOUT = "3600s"


def _nolog(_: str) -> None:
    pass


# --- recipes ------------------------------------------------------------------


class Recipe(BaseModel):
    """What `image build` installs. A recipe file is YAML with these keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    packages: tuple[str, ...] = Field(default=(), max_length=4096)
    suite: str | None = None
    """Debian suite (default: the host's own release)."""
    variant: str = "apt"
    """mmdebstrap variant: essential (Essential:yes packages only), apt (those plus apt: the
    default, so a writable image can apt-get install), minbase, required, buildd, important, standard."""

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not isinstance(p, str) or not PACKAGE_RE.match(p):
                raise ValueError(
                    f"{p!r} is not a Debian package name; expected lowercase letters, digits, "
                    "'+', '-', '.' (optionally =VERSION)"
                )
        return tuple(dict.fromkeys(v))

    @field_validator("suite")
    @classmethod
    def _suite(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9-]{0,63}", v):
            raise ValueError(f"{v!r} is not a suite name like bookworm or trixie")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if v not in VARIANTS:
            raise ValueError(f"{v!r} is not a variant; expected one of {', '.join(VARIANTS)}")
        return v

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ImageError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ImageError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ImageError(f"recipe {path}: expected a mapping with packages (a list), suite, variant")
    return make_recipe(data, str(path))


def make_recipe(data: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "recipe"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key; expected packages, suite, variant"
        raise ImageError(f"{where}: {loc}: {msg}") from None


# --- running tools ----------------------------------------------------------------


def need(tool: str, package: str | None = None) -> str:
    path = shutil.which(tool, path=TOOL_ENV["PATH"])
    if path is None:
        raise ImageError(f"{tool} is not installed: `apt-get install {package or tool}` (scripts/setup.sh installs it)")
    return path


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n  ".join(kept) or "(no output)"


def _skopeo(args: list[str], what: str, timeout: str = INSPECT_TIMEOUT) -> str:
    argv = [need("skopeo"), f"--command-timeout={timeout}", *args]
    r = subprocess.run(argv, capture_output=True, text=True, env=TOOL_ENV, check=False)
    if r.returncode != 0:
        hint = ""
        if "no space left on device" in r.stderr.lower():
            hint = " (the disk holding the image store is full: free space and try again)"
        raise ImageError(f"{what} failed{hint}; nothing was added to the store. skopeo said:\n  {_tail(r.stderr)}")
    return r.stdout


# --- build ----------------------------------------------------------------------


def build(store: ImageStore, name: str, recipe: Recipe, *, limits: UnpackLimits, log: Log = _nolog) -> StoredImage:
    check_name(name)
    mmdebstrap = need("mmdebstrap")
    suite = recipe.suite or sources.host_suite()
    text, uris = sources.sources_for(suite)
    with store.work() as work:
        (work.path / "host.sources").write_text(text)
        argv = [mmdebstrap, f"--variant={recipe.variant}", "--mode=unshare", "--format=tar"]
        argv += [f"--aptopt={o}" for o in sources.apt_options()]
        if recipe.packages:
            argv.append("--include=" + ",".join(recipe.packages))
        argv += [suite, "-", str(work.path / "host.sources")]
        log(
            f"building {name!r} with mmdebstrap ({suite}, variant {recipe.variant}, "
            f"{len(recipe.packages)} extra package(s)) from {', '.join(uris)}"
        )
        log_path = work.path / "mmdebstrap.log"
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**TOOL_ENV, "TMPDIR": str(work.path)},
                start_new_session=True,
                preexec_fn=term_with_parent,
            )
            watch = DiskWatch(work.path, proc, _stop)
            try:
                assert proc.stdout is not None
                with Unpacker(work.rootfs, limits) as u:
                    try:
                        u.apply(proc.stdout, "mmdebstrap's output")
                    except UnpackError:
                        rc = _wait(proc, 60)
                        if rc != 0:
                            raise _mmdebstrap_failed(rc, log_path, watch.full) from None
                        raise
                    work.notes.extend(_summary(u))
                rc = _wait(proc, 600)
            except BaseException:
                _stop(proc)
                raise
            finally:
                watch.stop()
        if rc != 0 or watch.full:
            raise _mmdebstrap_failed(rc, log_path, watch.full)
        log(f"mmdebstrap finished in {time.monotonic() - started:.0f} s")
        source = {
            "kind": "build",
            "tool": _version(mmdebstrap),
            "suite": suite,
            "variant": recipe.variant,
            "packages": list(recipe.packages),
            "recipe_sha256": recipe.sha256(),
            "apt_sources": uris,
        }
        return _publish(store, work, name, source, None, log)


def _mmdebstrap_failed(rc: int, log_path: Path, disk_full: bool = False) -> ImageError:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        text = ""
    hint = ""
    if disk_full or "No space left on device" in text:
        hint = " (the disk holding the image store is full: free space and build again)"
    elif "Unable to locate package" in text or "has no installation candidate" in text:
        hint = " (a package name is wrong or not in the host's apt sources for this suite)"
    return ImageError(
        f"mmdebstrap failed (exit {rc}){hint}; nothing was added to the store. Its last lines:\n  {_tail(text)}"
    )


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return proc.returncode if proc.returncode is not None else -9


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """mmdebstrap cleans up on SIGTERM (its mounts live in its own namespace anyway)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _version(tool: str) -> str:
    r = subprocess.run([tool, "--version"], capture_output=True, text=True, env=TOOL_ENV, check=False)
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else tool


# --- pull -------------------------------------------------------------------------


def default_name(ref: str) -> str:
    """`registry:5000/team/tool:1.2` -> `tool`."""
    base = ref.split("://", 1)[-1].split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    base = base.split(":", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("._-")[:64]
    return name or "image"


def pull(
    store: ImageStore,
    ref: str,
    name: str,
    *,
    limits: UnpackLimits,
    insecure: bool = False,
    authfile: str | None = None,
    log: Log = _nolog,
) -> StoredImage:
    check_name(name)
    if not ref or any(c.isspace() for c in ref) or ref.startswith("-"):
        raise ImageError(f"{ref!r} is not an image reference; expected REGISTRY/REPOSITORY[:TAG|@DIGEST]")
    src = ref if ref.startswith("docker://") else f"docker://{ref}"
    opts = [f"--tls-verify={'false' if insecure else 'true'}"]
    if authfile:
        opts.append(f"--authfile={authfile}")
    log(f"pulling {ref}")
    _check_remote_size(src, opts, limits, ref)
    copy_opts = [o.replace("--", "--src-", 1) for o in opts]
    return _copy_in(store, src, name, copy_opts, limits, {"kind": "pull", "ref": ref}, log)


def _check_remote_size(src: str, opts: list[str], limits: UnpackLimits, ref: str) -> None:
    """Refuse an image whose layers add up to more than the limit before downloading them."""
    raw = json.loads(_skopeo(["inspect", "--raw", *opts, src], f"looking up {ref}") or "{}")
    if raw.get("manifests"):  # an index: the entry for this host's platform
        arch = oci.host_architecture()
        match = [
            m
            for m in raw["manifests"]
            if (m.get("platform") or {}).get("os") == "linux" and (m.get("platform") or {}).get("architecture") == arch
        ]
        if not match:
            raise ImageError(f"{ref} has no linux/{arch} image")
        raw = json.loads(
            _skopeo(["inspect", "--raw", *opts, f"{_repository(src)}@{match[0]['digest']}"], f"looking up {ref}")
            or "{}"
        )
    total = sum(int(layer.get("size") or 0) for layer in raw.get("layers") or [])
    if total > limits.max_bytes:
        raise ImageError(
            f"{ref} is {human_size(total)} compressed, above the limit of {human_size(limits.max_bytes)}; "
            "nothing was downloaded (raise --max-size to allow it)"
        )


def _repository(src: str) -> str:
    """docker://host:5000/a/b:tag@sha256:... -> docker://host:5000/a/b"""
    body = src.split("@", 1)[0]
    head, _, last = body.rpartition("/")
    if ":" in last:
        last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


# --- import -----------------------------------------------------------------------


def import_file(store: ImageStore, path: str, name: str, *, limits: UnpackLimits, log: Log = _nolog) -> StoredImage:
    check_name(name)
    p = Path(path)
    if not p.exists():
        raise ImageError(
            f"{path}: no such file or directory; expected a docker-save tarball, an OCI archive or an OCI layout directory"
        )
    kind = _archive_kind(p, limits)
    with store.work() as work:
        # skopeo's `oci:PATH:REF` syntax cannot take a path with ':'; a link can.
        link = work.path / "input"
        os.symlink(p.resolve(), link)
        log(f"importing {path} ({kind})")
        return _copy_in_work(
            store,
            work,
            f"{kind}:{link}",
            name,
            [],
            limits,
            {"kind": "import", "file": str(p.resolve()), "format": kind},
            log,
        )


def _archive_kind(p: Path, limits: UnpackLimits) -> str:
    if p.is_dir():
        if not (p / "oci-layout").is_file() or not (p / "index.json").is_file():
            raise ImageError(f"{p} is a directory but not an OCI image layout (no oci-layout and index.json)")
        total = sum(f.stat().st_size for f in (p / "blobs").rglob("*") if f.is_file())
        if total > limits.max_bytes:
            raise ImageError(
                f"{p} holds {human_size(total)}, above the limit of {human_size(limits.max_bytes)} (--max-size)"
            )
        return "oci"
    size = p.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(
            f"{p} is {human_size(size)}, above the limit of {human_size(limits.max_bytes)}; nothing was imported (raise --max-size to allow it)"
        )
    names: set[str] = set()
    try:
        with tarfile.open(p, "r:") as tar:
            for member in tar:
                names.add(member.name.lstrip("./").rstrip("/"))
                if len(names) > 100_000:
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(
            f"{p} is not a complete, uncompressed tar archive ({e}); expected `docker save` output, "
            "an OCI archive or an OCI layout directory (decompress a .tar.gz first)"
        ) from None
    if "oci-layout" in names and "index.json" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise ImageError(
        f"{p} is a tar archive but neither `docker save` output (no manifest.json) nor an OCI archive (no oci-layout)"
    )


# --- common -----------------------------------------------------------------------


def _copy_in(
    store: ImageStore, src: str, name: str, opts: list[str], limits: UnpackLimits, source: dict[str, Any], log: Log
) -> StoredImage:
    with store.work() as work:
        return _copy_in_work(store, work, src, name, opts, limits, source, log)


def _copy_in_work(
    store: ImageStore,
    work: Work,
    src: str,
    name: str,
    opts: list[str],
    limits: UnpackLimits,
    source: dict[str, Any],
    log: Log,
) -> StoredImage:
    layout = work.path / "layout"
    _skopeo(
        ["copy", "--quiet", f"--tmpdir={work.path}", *opts, src, f"oci:{layout}:img"],
        f"copying {source.get('ref') or source.get('file')}",
        timeout=COPY_TIMEOUT,
    )
    image = oci.read_layout(layout, "img")
    if image.compressed_size > limits.max_bytes:
        raise ImageError(
            f"the image's layers are {human_size(image.compressed_size)}, above the limit of {human_size(limits.max_bytes)}"
        )
    log(f"unpacking {len(image.layers)} layer(s), {human_size(image.compressed_size)}")
    with Unpacker(work.rootfs, limits) as u:
        oci.apply_layers(layout, image, u)
        work.notes.extend(_summary(u))
    shutil.rmtree(layout)  # the blobs are no longer needed; free the space before publishing
    source = {**source, "manifest_digest": image.manifest_digest}
    return _publish(store, work, name, source, image.config, log)


def _summary(u: Unpacker) -> list[str]:
    notes = list(u.stats.notes)
    if u.stats.dropped > len(notes):
        notes.append(f"... {u.stats.dropped - len(notes)} more dropped or changed entries")
    return notes


def _publish(
    store: ImageStore, work: Work, name: str, source: dict[str, Any], config: dict[str, Any] | None, log: Log
) -> StoredImage:
    log("computing the image digest")
    image = store.add(work, name, source, config)
    log(f"{name} -> {image.digest} ({human_size(image.size)})")
    return image
