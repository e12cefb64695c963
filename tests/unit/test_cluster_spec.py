"""The agent's own checks of a run spec (cluster/spec.py): pure, no Ray.

A spec reaches an agent from anyone holding the cluster token, so every
field the front end's policy decided is decided again by the host: images by
name and digest, egress rules within the host's ceiling, and the fence that
no ceiling opens (network/fence.py, tested in test_proxy.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gvisor_mcp.cluster.spec import HostCeilings, RunSpec, SpecRefused, to_options
from gvisor_mcp.network.egress import EgressRules
from gvisor_mcp.sandbox import ResourceSpec

DEFAULTS = ResourceSpec(timeout=60, memory_mb=256, max_pids=128, max_output_bytes=1 << 20, cpus=1)
RID = "res_" + "a" * 32
DIGEST = "sha256:" + "b" * 64


class FakeImages:
    """Stands in for an ImageStore with one image `py` (the real store needs unpacked trees)."""

    def __init__(self, digest: str = DIGEST, names: tuple[str, ...] = ("py",)) -> None:
        self.digest = digest
        self.names = names

    def get(self, ref: str):
        from gvisor_mcp.images.store import ImageError, StoredImage

        if ref not in self.names:
            raise ImageError(f"no image {ref!r} in the store")
        return StoredImage(digest=self.digest, size=1, entries=1, created="now", source={}, path="/srv/img/py")


def spec(**kw) -> RunSpec:
    return RunSpec(result_id=RID, tenant="bob", command=("/bin/true",), **kw)


def options(s: RunSpec, ceilings: HostCeilings, images=None):
    return to_options(s, ceilings, DEFAULTS, Path("/var/lib/agent/workspaces"), images)


CEILINGS = HostCeilings(
    cpus=2,
    networks=("none", "sandbox"),
    images={"py": "store:py", "tools": "/srv/rootfs/tools"},
    egress=EgressRules(
        allow=["pypi.org", "*.pythonhosted.org", "10.1.0.0/16:3128"],
        hosts={"mirror.internal": "10.1.2.3"},
        max_connections=8,
    ),
)


def test_a_store_image_runs_its_own_copy_of_the_same_digest():
    o = options(spec(image="py", image_digest=DIGEST), CEILINGS, FakeImages())
    assert o.rootfs == "/srv/img/py/rootfs"
    assert options(spec(image="tools"), CEILINGS).rootfs == "/srv/rootfs/tools"
    assert options(spec(), CEILINGS).rootfs is None


@pytest.mark.parametrize(
    "kw, images, why",
    [
        ({"image": "py", "image_digest": "sha256:" + "c" * 64}, FakeImages(), "the operator must build or pull"),
        ({"image": "py"}, None, "this host has no image store"),
        ({"image": "py"}, FakeImages(names=()), "not in this host's image store"),
        ({"image": "other"}, FakeImages(), "not in this host's catalog (host, py, tools)"),
        ({"image": "/"}, FakeImages(), "not in this host's catalog"),
        ({"image": "tools", "image_digest": DIGEST}, FakeImages(), "is a directory on this host"),
        ({"image_digest": DIGEST}, FakeImages(), "has no digest"),
    ],
)
def test_forged_images_are_refused(kw, images, why):
    with pytest.raises(SpecRefused) as e:
        options(spec(**kw), CEILINGS, images)
    assert why in str(e.value), str(e.value)


def test_egress_within_the_host_ceiling_is_narrowed_and_limited():
    asked = EgressRules(
        allow=["pypi.org:443", "10.1.2.0/24:3128"], hosts={"mirror.internal": "10.1.2.3"}, max_connections=100
    )
    o = options(spec(network="sandbox", egress=asked), CEILINGS)
    assert [str(r) for r in o.egress.allow] == [str(r) for r in asked.allow]
    assert o.egress.max_connections == 8  # the lower of the two
    assert options(spec(network="none"), CEILINGS).egress is None


@pytest.mark.parametrize(
    "kw, why",
    [
        ({"network": "sandbox", "egress": EgressRules(allow=["*"])}, "not within the egress allowlist"),
        ({"network": "sandbox", "egress": EgressRules(allow=["127.0.0.0/8:6379"])}, "not within the egress allowlist"),
        ({"network": "sandbox", "egress": EgressRules(allow=["pypi.org:22"])}, "not within the egress allowlist"),
        (
            {"network": "sandbox", "egress": EgressRules(allow=["pypi.org"], hosts={"pypi.org": "127.0.0.1"})},
            "egress.hosts: pypi.org -> 127.0.0.1 is not one of this host's static names",
        ),
        ({"network": "none", "egress": EgressRules(allow=["pypi.org"])}, "egress rules need network='sandbox'"),
        ({"network": "host"}, "network='host'"),
    ],
)
def test_forged_egress_is_refused(kw, why):
    with pytest.raises(SpecRefused) as e:
        options(spec(**kw), CEILINGS)
    assert why in str(e.value), str(e.value)


def test_sandbox_network_is_refused_by_a_host_that_does_not_offer_it():
    with pytest.raises(SpecRefused, match="this host runs none"):
        options(spec(network="sandbox"), HostCeilings(cpus=2))
