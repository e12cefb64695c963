"""What a policy needs from the image store: its catalog's store images exist,
and can run what the policy asks of them.

Checked when a policy is loaded with a store (`serve`, `policy check`), so
an operator learns of a missing image — and the exact command that makes
it — before an agent asks for it.
"""

from __future__ import annotations

import os
import stat

from ..images.errors import ImageError
from ..images.store import ImageStore, StoredImage
from ..images.tree import lookup
from .model import BUILTIN_IMAGE, PolicyFile, Settings, TenantSettings
from .source import KeyPath

Issue = tuple[KeyPath, str, str]


def check_store_images(file: PolicyFile, tenants: dict[str, TenantSettings], images: ImageStore) -> list[Issue]:
    """Issues for store images that are missing, or lack /bin/sh or the workspace mount point."""
    issues: list[Issue] = []
    sections: list[tuple[KeyPath, Settings]] = [((), file)]
    sections += [(("tenants", n), t) for n, t in file.tenants.items()]
    found: dict[str, StoredImage] = {}
    for base, sec in sections:
        for name, entry in sec.images.catalog.items():
            if entry.store is None or entry.store in found:
                continue
            try:
                found[entry.store] = images.get(entry.store)
            except ImageError as e:
                issues.append(
                    ((*base, "images", "catalog", name), str(e), "an image in the store (`gvisor-mcp image list`)")
                )
    for tname, s in tenants.items():
        base = () if tname == "default" else ("tenants", tname)
        for name in s.images.allowed:
            listed = s.images.catalog.get(name)
            if name == BUILTIN_IMAGE or listed is None or listed.store not in found:
                continue
            image = found[listed.store]
            where = (*base, "images", "catalog", name)
            if not image.has_shell:
                issues.append(
                    (
                        where,
                        f"store image {listed.store!r} ({image.short}) has no /bin/sh",
                        "an image with a shell: every command runs as /bin/sh -c COMMAND",
                    )
                )
            if s.workspace.enabled and not _is_dir(image.rootfs, s.workspace.mount):
                issues.append(
                    (
                        where,
                        f"store image {listed.store!r} has no directory {s.workspace.mount} for the workspace "
                        f"mount{'' if tname == 'default' else f' of tenant {tname!r}'}",
                        "an image that has it (store images get /workspace), or workspace.mount: /workspace",
                    )
                )
    return issues


def _is_dir(rootfs: str, path: str) -> bool:
    try:
        fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = lookup(fd, path)
    finally:
        os.close(fd)
    return st is not None and stat.S_ISDIR(st.st_mode)
