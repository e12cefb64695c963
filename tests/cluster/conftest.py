"""A real Ray cluster on this machine: a head and two worker nodes ("a", "b"),
each with its own HostAgent (own runsc root, bundles, cgroup parent, state
directory), under token authentication and on loopback only.

One cluster per module (it takes 10-50 s to start on this shared 2-core
machine and ~1 GB); the teardown stops the agents, shuts the cluster down,
and fails the run if a Ray process or any sandbox leftover survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gvisor_mcp.cluster import ray_missing
from gvisor_mcp.cluster.local import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before anything imports ray (see cluster/local.py)

from ..conftest import CGROUP_PARENT, TEST_BASE, leftovers, runsc_usable

POLICY = """\
version: 1
defaults:
  timeout: 2m
  memory: 256MiB
tenants:
  alice:
    workspace: {enabled: true, scope: tenant, size: 64MiB}
  bob:
    workspace: {enabled: false}
  carol:
    workspace: {enabled: false}
    quotas: {max_concurrent: 1}
  dave:
    workspace: {enabled: true, scope: session, size: 32MiB}
"""


def skip_reason() -> str | None:
    return runsc_usable() or ray_missing()


@dataclass
class Harness:
    base: Path
    lc: Any
    policy: Any
    agents: dict[str, Any] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, dict] = field(default_factory=dict)
    mini_digest: str | None = None

    @property
    def gcs_port(self) -> int:
        return int(self.lc.address.rpartition(":")[2])

    def host_base(self, host: str) -> Path:
        return self.base / host

    def config(self, host: str, **manager: Any) -> Any:
        from gvisor_mcp.cluster.agent import AgentConfig
        from gvisor_mcp.sandbox import ManagerConfig

        hb = self.host_base(host)
        extra: dict[str, Any] = {}
        if host == "a":  # a runs an unnamed store image by digest (the image hold test)
            from gvisor_mcp.cluster.spec import default_ceilings

            self.mini_digest = self.mini_digest or mini_store_image(hb / "state" / "images")
            extra["ceilings"] = default_ceilings().model_copy(update={"images": {"mini": f"store:{self.mini_digest}"}})
        if host == "b":  # b also runs network=sandbox, with an egress ceiling that names the head's GCS
            from gvisor_mcp.cluster.spec import default_ceilings
            from gvisor_mcp.network.egress import EgressRules

            extra["ceilings"] = default_ceilings().model_copy(
                update={
                    "networks": ("none", "sandbox"),
                    "egress": EgressRules(allow=[{"cidr": "127.0.0.0/8", "ports": [self.gcs_port, 80]}]),
                }
            )
        return AgentConfig(
            host=host,
            **extra,
            state_dir=hb / "state",
            manager=ManagerConfig(
                bundle_base_dir=str(hb / "bundles"),
                runsc_root=str(hb / "runsc"),
                cgroup_parent=f"{CGROUP_PARENT}-{host}",
                max_concurrent_containers=4,
                **manager,
            ),
        )

    def start_agent(self, host: str, **manager: Any) -> dict:
        from gvisor_mcp.cluster.agent import start_agent

        cfg = self.configs.get(host) if not manager else None
        cfg = cfg or self.config(host, **manager)
        self.configs[host] = cfg
        handle, report = start_agent(cfg)
        self.agents[host] = handle
        self.reports[host] = report
        return report

    def stop_agent(self, host: str) -> None:
        import ray

        handle = self.agents.pop(host, None)
        if handle is None:
            return
        try:
            ray.get(handle.stop.remote(), timeout=60)
        except Exception:
            pass
        ray.kill(handle)

    def runner(self, **kw: Any) -> Any:
        from gvisor_mcp.cluster.agent import runsc_version
        from gvisor_mcp.cluster.frontend import RayRunner

        return RayRunner(
            self.policy,
            self.base / "fe" / "workspaces",
            self.base / "fe",
            expected_runsc_version=runsc_version("runsc"),
            **kw,
        )

    def leftovers(self, host: str, settle: float = 60.0) -> dict:
        """What is left on `host` but the spare roots its running agent's Manager
        keeps made ahead (sandbox/spares.py: they are its own, not a leftover;
        a dead agent's are, and its successor reaps them).

        A run answered early tears its sandbox down in the background
        (Manager._teardown_later): on a loaded machine its bundle may still be
        there when the answer arrives, so this looks again for up to `settle`
        seconds before reporting what stays."""
        deadline = time.monotonic() + settle
        while True:
            left = self._leftovers(host)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def _leftovers(self, host: str) -> dict:
        import ray

        left = leftovers(self.host_base(host), f"{CGROUP_PARENT}-{host}")
        handle = self.agents.get(host)
        if handle is not None and "spare bundles" in left:
            instance = ray.get(handle.health.remote(), timeout=60).get("instance")
            theirs = [n for n in left["spare bundles"] if not n.startswith(f".spare-gm-{instance}-")]
            if theirs:
                left["spare bundles"] = theirs
            else:
                del left["spare bundles"]
        return left


def mini_store_image(root: Path) -> str:
    """An unnamed image in the store at `root` with just /bin/sh (dash) and
    /bin/sleep and their libraries from this host; its digest. Made by the
    store's own unpack-and-add path; unnamed, so `image prune` removes it
    unless something holds it."""
    import io

    from gvisor_mcp.images.store import ImageStore
    from gvisor_mcp.images.unpack import Unpacker

    from ..images_helpers import Entry, layer_tar

    def lib(name: str) -> bytes:
        return Path(os.path.realpath(name)).read_bytes()

    entries = [
        Entry("bin/", "dir"),
        Entry("lib/", "dir"),
        Entry("lib/x86_64-linux-gnu/", "dir"),
        Entry("lib64/", "dir"),
        Entry("tmp/", "dir", mode=0o1777),
        Entry("bin/sh", data=lib("/bin/dash"), mode=0o755),
        Entry("bin/sleep", data=lib("/bin/sleep"), mode=0o755),
        Entry("lib/x86_64-linux-gnu/libc.so.6", data=lib("/lib/x86_64-linux-gnu/libc.so.6"), mode=0o755),
        Entry("lib64/ld-linux-x86-64.so.2", data=lib("/lib64/ld-linux-x86-64.so.2"), mode=0o755),
    ]
    store = ImageStore(root)
    with store.work() as work:
        with Unpacker(work.rootfs) as u:
            u.apply(io.BytesIO(layer_tar(*entries)))
        image = store.add(work, "mini", {"kind": "test"})
    (root / "names" / "mini").unlink()  # unnamed: only a hold keeps it from `image prune`
    return image.digest


@pytest.fixture(scope="module")
def cluster() -> Any:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)

    from gvisor_mcp.cluster.frontend import connect
    from gvisor_mcp.cluster.local import LocalCluster, ray_processes
    from gvisor_mcp.runtime import PolicyHolder

    base = TEST_BASE / f"ray-{uuid.uuid4().hex[:6]}"
    base.mkdir(parents=True)
    (base / "policy.yaml").write_text(POLICY)
    lc = LocalCluster(base / "c")
    h = Harness(base, lc, PolicyHolder(str(base / "policy.yaml")))
    try:
        lc.start(hosts=("a", "b"), attempts=5)  # Ray gives a raylet 30 s to register: a loaded machine misses it
        connect(lc.address)
        for host in ("a", "b"):
            h.start_agent(host)
        yield h
    finally:
        for host in list(h.agents):
            h.stop_agent(host)
        lc.shutdown()
        deadline = time.monotonic() + 30
        while ray_processes(lc.tmpdir) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = ray_processes(lc.tmpdir)
        left = {host: h.leftovers(host) for host in ("a", "b", "c")}
        for host, what in left.items():  # keep the machine clean even after a failure
            if what:
                subprocess.run(
                    [
                        str(Path(sys.executable).parent / "gvisor-mcp"),
                        "cleanup",
                        "--state-root",
                        str(h.host_base(host)),
                        "--cgroup-parent",
                        f"{CGROUP_PARENT}-{host}",
                    ],
                    check=False,
                    capture_output=True,
                )
        _unmount_all(base)
        shutil.rmtree(base, ignore_errors=True)
        # Every host's parent: tests add hosts ("d") beyond the fixture's own.
        for ctl in Path("/sys/fs/cgroup").iterdir():
            for d in ctl.glob(f"{CGROUP_PARENT}-*") if not ctl.is_symlink() else ():
                try:
                    d.rmdir()
                except OSError:
                    pass
    assert survivors == [], f"Ray processes outlived the cluster: {survivors}"
    assert all(v == {} for v in left.values()), left


def _unmount_all(base: Path) -> None:
    from gvisor_mcp import workspace

    for mp, _ in workspace.loop_mounts():
        if base in mp.parents:
            subprocess.run(["umount", "-l", str(mp)], check=False)
