"""Building image archives in tests: layer tars (hostile ones included) and
OCI image layouts / docker-save tarballs around them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "hard": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass
class Entry:
    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    link: str = ""
    uid: int = 0
    gid: int = 0
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def layer_tar(*entries: Entry) -> bytes:
    """An uncompressed tar with exactly these members, names kept verbatim."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = TYPES[e.kind]
            info.mode = e.mode if e.kind != "dir" or e.mode != 0o644 else 0o755
            info.uid, info.gid = e.uid, e.gid
            info.linkname = e.link
            info.devmajor, info.devminor = e.devmajor, e.devminor
            info.mtime = 1_700_000_000
            info.pax_headers = dict(e.pax)
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(
    layout: Path,
    layers: list[bytes],
    *,
    ref: str = "latest",
    compress: bool = True,
    architecture: str = "amd64",
    env: list[str] | None = None,
) -> Path:
    """An OCI image layout directory holding one image made of `layers` (lowest first)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids, descs = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        data = gzip.compress(raw, mtime=0) if compress else raw
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": media, **_blob(layout, data)})
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": env or ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json", **_blob(layout, json.dumps(config).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": descs,
    }
    mdesc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_blob(layout, json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": ref},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return layout


def tar_directory(directory: Path, out: Path) -> Path:
    """`directory` as a tar file (e.g. an OCI layout as an oci-archive)."""
    with tarfile.open(out, "w") as tar:
        for p in sorted(directory.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(directory)), recursive=False)
    return out


def store_with(root: Path, *names: str):
    """A real image store at `root` holding a tiny image (a shell script as
    /bin/sh) under each of `names`: made by the store's own unpack-and-add
    path, without skopeo, for tests that only need the names to exist."""
    from gvisor_mcp.images.store import ImageStore
    from gvisor_mcp.images.unpack import Unpacker

    store = ImageStore(root)
    for name in names:
        with store.work() as work:
            with Unpacker(work.rootfs) as u:
                u.apply(io.BytesIO(layer_tar(Entry("bin/", "dir"), Entry("bin/sh", data=b"#!", mode=0o755))))
            store.add(work, name, {"kind": "test"})
    return store
