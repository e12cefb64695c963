"""A multi-node Ray cluster on this one machine, for tests and benchmarks.

`ray.cluster_utils.Cluster` runs a head and worker nodes as separate raylets
on one host. Here it is set up the way the docs ask a real cluster to be:

- token authentication (`RAY_AUTH_MODE=token`), the token in a 0600 file
  named by `RAY_AUTH_TOKEN_PATH` (never `~/.ray/auth_token`, never argv);
- every Ray port on 127.0.0.1 (`node_ip_address`), and
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` so that drivers resolve "127.0.0.1"
  to loopback instead of asking the kernel for the route to 8.8.8.8 (Ray's
  way to find "the" node address) — nothing leaves the machine;
- no dashboard (`include_dashboard=False`; the per-node dashboard agent
  still starts, on loopback);
- node failure detected in seconds (HEALTH_CHECK), not Ray's default ~60 s.

Ray reads the auth environment once per process (its C++ token loader
caches it), so one process talks to one cluster token; a "client without
the token" must be another process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from . import HOST_RESOURCE_PREFIX

HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
"""GCS health checks of raylets: a node that stops answering is declared dead
after ~3-5 s (measured: 5.1 s for a SIGSTOPped node; Ray's defaults took 63 s).
`ray start --head --system-config=...` takes the same keys."""


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
"""Read by Ray at import: set before the first `import ray` of a process."""


def write_token(path: Path) -> str:
    """A new 256-bit cluster token in a 0600 file (what `ray get-auth-token
    --generate` makes, at a path we choose)."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def ray_env(token_path: Path, tmpdir: Path) -> dict[str, str]:
    """The environment a process needs to be part of (or a client of) the cluster."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_TMPDIR": str(tmpdir),
        **LOOPBACK_ENV,
    }


class LocalCluster:
    """A head node (no agent resources) and named worker "hosts".

    Each worker node carries the custom resource `gvisor_mcp_host_<name>`,
    so an agent can be pinned to it. `shutdown()` stops every process it
    started; call it in a `finally`.
    """

    def __init__(self, base: Path, *, cpus_per_node: int = 1) -> None:
        self.base = base
        self.cpus = cpus_per_node
        # Unix socket paths must stay under ~107 bytes: keep this short.
        self.tmpdir = base / "r"
        self.token_path = base / "token"
        self.cluster: Any = None
        self.hosts: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    @property
    def address(self) -> str:
        return self.cluster.address

    def env(self) -> dict[str, str]:
        return ray_env(self.token_path, self.tmpdir)

    def start(self, hosts: tuple[str, ...] = (), *, attempts: int = 3) -> LocalCluster:
        """Start the head and `hosts`. Ray gives a raylet a fixed 30 s to
        register with the GCS, which a loaded 2-core machine can miss: a
        failed start is torn down (every process it left, by pid) and tried
        again, up to `attempts` times."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(hosts)
            except Exception as e:
                if attempt == attempts or "timed out during startup" not in str(e):
                    raise
                self.shutdown()
                kill_ray_processes(self.tmpdir)
                time.sleep(2)
        raise AssertionError("unreachable")

    def _start(self, hosts: tuple[str, ...]) -> LocalCluster:
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmpdir.mkdir(exist_ok=True, mode=0o700)
        if not self.token_path.exists():
            write_token(self.token_path)
        os.environ.update(self.env())
        _reload_auth()
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: drivers would "
                "look for the node address via 8.8.8.8 and miss the loopback cluster. Set "
                "LOOPBACK_ENV in os.environ before the first `import ray`"
            )
        from ray.cluster_utils import Cluster

        t0 = time.monotonic()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": self.cpus,
                "include_dashboard": False,
                "node_ip_address": "127.0.0.1",
                "_system_config": HEALTH_CHECK,
            },
        )
        self.timings["head_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        for name in hosts:
            self.add_host(name, wait=False)
        self.cluster.wait_for_nodes()
        self.timings["workers_s"] = time.monotonic() - t1
        return self

    def add_host(self, name: str, *also: str, wait: bool = True) -> Any:
        """A worker node for host `name` (and for `also`: several agents on one node)."""
        node = self.cluster.add_node(
            wait=wait,
            num_cpus=self.cpus,
            node_ip_address="127.0.0.1",
            resources={f"{HOST_RESOURCE_PREFIX}{n}": 1 for n in (name, *also)},
        )
        self.hosts[name] = node
        return node

    def remove_host(self, name: str, *, graceful: bool = False) -> None:
        """Kill every Ray process of the host's node (a crashed machine)."""
        node = self.hosts.pop(name)
        self.cluster.remove_node(node, allow_graceful=graceful)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.shutdown()
        self.hosts.clear()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _reload_auth() -> None:
    """Make this process see the auth environment set above even if Ray was
    imported before (Ray reads RAY_AUTH_MODE into its C++ config at import and
    caches the token): the same two calls Ray makes when it turns token
    auth on for a local cluster."""
    # ray._raylet is a compiled module Ray ships without type information.
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def ray_processes(tmpdir: Path) -> list[int]:
    """Pids of Ray processes (raylet, gcs_server, workers) whose command line or
    environment names `tmpdir`: what a test checks is gone after shutdown."""
    mark = str(tmpdir).encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if mark in cmd or mark in env:
            found.append(int(pid))
    return found


def kill_ray_processes(tmpdir: Path, wait: float = 10.0) -> None:
    """SIGKILL the Ray processes of this cluster only (found by `tmpdir`), then wait for them."""
    import signal

    for pid in ray_processes(tmpdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while ray_processes(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.2)
