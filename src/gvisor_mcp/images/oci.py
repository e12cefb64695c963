"""Read an OCI image layout (as skopeo writes it) and apply its layers.

skopeo does every transport (registries, docker-save tarballs, OCI archives)
and verifies every blob's digest on the way in; this module only reads the
layout skopeo wrote into our work directory: index -> manifest -> config
and layers, each layer applied by the hostile-archive-proof Unpacker.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError
from .store import DIGEST_RE
from .unpack import Unpacker

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
MAX_JSON = 4 * 1024 * 1024


def host_architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Image:
    manifest_digest: str
    layers: tuple[Layer, ...]
    config: dict[str, Any]
    """The OCI config's `config` object (Env, Cmd, Entrypoint, WorkingDir, User, Labels)."""
    architecture: str
    os: str

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def _blob_path(layout: Path, digest: str) -> Path:
    m = DIGEST_RE.match(digest or "")
    if not m:
        raise ImageError(f"the image refers to a blob {digest!r} that is not a sha256 digest")
    return layout / "blobs" / "sha256" / m.group(1)


def _json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_JSON:
            raise ImageError(f"the image's {what} is larger than {MAX_JSON} bytes")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ImageError(f"the image's {what} is missing") from None
    except ValueError as e:
        raise ImageError(f"the image's {what} is not valid JSON ({e})") from None


def read_layout(layout: Path, ref: str | None = None) -> Image:
    """The one image of `layout` (or the one whose ref name is `ref`)."""
    index = _json(layout / "index.json", "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError("the OCI layout's index.json lists no image")
    if ref is not None:
        picked = [m for m in manifests if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref]
        if not picked:
            raise ImageError(f"the OCI layout has no image named {ref!r}")
        manifests = picked
    if len(manifests) != 1:
        raise ImageError("the OCI layout holds several images; name the one to use")
    desc = manifests[0]
    media = desc.get("mediaType", "")
    if media in INDEX_TYPES:
        raise ImageError("the image is a multi-platform index; pull or import a single-platform image")
    manifest = _json(_blob_path(layout, desc.get("digest", "")), "manifest")
    if manifest.get("mediaType", media) not in MANIFEST_TYPES and media not in MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest type {manifest.get('mediaType') or media!r}")
    config_desc = manifest.get("config") or {}
    config = _json(_blob_path(layout, config_desc.get("digest", "")), "config")
    arch, os_name = config.get("architecture", ""), config.get("os", "")
    if os_name and os_name != "linux":
        raise ImageError(f"the image is for {os_name!r}; only linux images can run here")
    if arch and arch != host_architecture():
        raise ImageError(f"the image is for {arch!r}; this host runs {host_architecture()!r}")
    layers = []
    for i, layer in enumerate(manifest.get("layers") or []):
        lt = layer.get("mediaType", "")
        if lt not in LAYER_TYPES:
            hint = " (zstd layers are not supported: re-push the image with gzip layers)" if "zstd" in lt else ""
            raise ImageError(f"layer {i} has unsupported media type {lt!r}{hint}")
        size = layer.get("size")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"layer {i} has no valid size")
        _blob_path(layout, layer.get("digest", ""))
        layers.append(Layer(digest=layer["digest"], size=size, media_type=lt))
    inner = config.get("config") or {}
    keep = {k: inner[k] for k in ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels") if k in inner}
    return Image(manifest_digest=desc["digest"], layers=tuple(layers), config=keep, architecture=arch, os=os_name)


def apply_layers(layout: Path, image: Image, unpacker: Unpacker) -> None:
    for i, layer in enumerate(image.layers):
        with open(_blob_path(layout, layer.digest), "rb") as f:
            unpacker.apply(f, f"layer {i} ({layer.digest[:19]})")
