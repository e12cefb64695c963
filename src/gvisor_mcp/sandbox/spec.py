"""Options -> OCI runtime spec (a plain dict, written as config.json).

Pure: no filesystem writes. The Manager supplies the per-run paths (root
directory, generated /etc, cgroup path); without them placeholders are used so
the spec can be inspected in tests and docs.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from .options import (
    DEFAULT_MAX_PIDS,
    ContainerOptions,
    InvalidOptionsError,
    NetworkMode,
    ResourceSpec,
)
from .rootfs import DEFAULT_TMP_MB, container_path_exists, host_system_entries

DEFAULT_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
}
"""Always present unless the caller's env overrides a key."""

CHDIR_SHIM = 'cd "$1" || exit $?; unset OLDPWD; shift; exec "$@"'
"""Built-in image: the command starts in `/` and this shim, inside the sandbox,
changes to the workdir and execs the command (see build_spec)."""

ROOT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
"""The OCI default set for uid 0 inside the sandbox; other users get none."""

CPU_PERIOD_US = 100_000
RLIMIT_NOFILE = 4096


class CgroupV2Entry(BaseModel):
    """One cgroup v2 interface file and the value written to it."""

    model_config = ConfigDict(frozen=True)

    file: str
    value: str


def host_pids_limit(max_pids: int) -> int:
    """The host pids cgroup limit: a safety net, not the app's limit.

    runsc's own threads count there (~24 to boot, ~2.4 per app process, never
    released), and hitting it crashes the whole sandbox. The app is limited by
    RLIMIT_NPROC inside gVisor instead; this stays well above it.
    """
    return 128 + 4 * (max_pids or DEFAULT_MAX_PIDS)


def to_cgroup_v2_entries(res: ResourceSpec) -> list[CgroupV2Entry]:
    """The cgroup v2 files that enforce `res` (zero fields are unlimited)."""
    entries = []
    if res.memory_mb:
        entries.append(CgroupV2Entry(file="memory.max", value=str(res.memory_mb * 1024 * 1024)))
        entries.append(CgroupV2Entry(file="memory.swap.max", value="0"))
    if res.cpus:
        quota = max(1000, math.ceil(res.cpus * CPU_PERIOD_US))
        entries.append(CgroupV2Entry(file="cpu.max", value=f"{quota} {CPU_PERIOD_US}"))
    entries.append(CgroupV2Entry(file="pids.max", value=str(host_pids_limit(res.max_pids))))
    return entries


def mount_plan(
    options: ContainerOptions, etc_dir: str | None = None
) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """The OCI mounts, plus (dest, source) binds and tmpfs dests for path checks."""
    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    binds: list[tuple[str, str]] = []
    tmpfs: list[str] = []
    if options.rootfs is None:
        for name, target in host_system_entries():
            if target is None:
                binds.append(("/" + name, "/" + name))
        binds.append(("/etc", etc_dir or "/nonexistent/generated-etc"))
        for dest, src in binds:
            mounts.append(
                {
                    "destination": dest,
                    "type": "bind",
                    "source": src,
                    "options": ["rbind", "ro", "nosuid", "nodev"],
                }
            )
    # Every image gets the same size-bounded /tmp (its memory counts against the run's).
    mounts.append(
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={DEFAULT_TMP_MB}m"],
        }
    )
    tmpfs.append("/tmp")
    for m in options.extra_mounts:
        if m.type == "tmpfs":
            mounts.append(
                {
                    "destination": m.destination,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": [
                        "nosuid",
                        "nodev",
                        "mode=1777",
                        f"size={m.size_mb or 64}m",
                        *(["ro"] if m.read_only else []),
                    ],
                }
            )
            tmpfs.append(m.destination)
        else:
            mounts.append(
                {
                    "destination": m.destination,
                    "type": "bind",
                    "source": m.source,
                    "options": ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"],
                }
            )
            binds.append((m.destination, m.source))
    return mounts, binds, tmpfs


def check_workdir(options: ContainerOptions) -> None:
    """The workdir must exist in the image or a mount: runsc would otherwise
    create it inside the host root directory, even a read-only one.

    With an image directory (`rootfs`), every bind mount point must exist in
    the image too: runsc's gofer creates a missing one inside the image
    directory on the host (measured with runsc 2024-07-29), and an image may
    be shared by every run and must never change.
    """
    _, binds, tmpfs = mount_plan(options)
    if not container_path_exists(options.workdir, options.rootfs, binds, tmpfs):
        raise InvalidOptionsError(
            "workdir",
            options.workdir,
            "an existing directory in the container, e.g. / or /tmp or a mounted directory",
        )
    if options.rootfs is not None:
        for i, (dest, _) in enumerate(binds):
            if not container_path_exists(dest, options.rootfs, binds[:i], []):
                raise InvalidOptionsError(
                    "mount.destination",
                    dest,
                    f"a directory that exists in the image {options.rootfs} (runsc would create it "
                    "inside the image directory on the host); store images have /workspace and /tmp",
                )


def build_spec(
    options: ContainerOptions,
    *,
    root_path: str | None = None,
    etc_dir: str | None = None,
    cgroups_path: str | None = None,
    resources: ResourceSpec | None = None,
    hostname: str = "sandbox",
    netns_path: str | None = None,
) -> dict:
    """The OCI spec for one run. `resources` overrides options.resources
    (the Manager passes them merged with its defaults)."""
    res = resources or options.resources
    user = options.user
    uid, gid = (user.uid, user.gid) if user else (0, 0)
    caps = ROOT_CAPS if uid == 0 else []
    env = dict(DEFAULT_ENV)
    env.update(options.env or {})
    nproc = res.max_pids or DEFAULT_MAX_PIDS
    mounts, _, _ = mount_plan(options, etc_dir)
    args, cwd = list(options.command), options.workdir
    if cwd != "/":
        # runsc creates a missing cwd ON THE HOST, as root, even inside a
        # read-only bind (host /usr, the generated /etc) or a read-only image
        # directory (which every run shares and must never change).
        # check_workdir refuses a missing workdir beforehand, but a command
        # still running in the same workspace could swap a checked directory
        # for a symlink before runsc starts. So runsc only ever sees `/` and
        # the sandbox itself changes directory: a missing one is an error
        # there, never a mkdir on the host. (Like the warm pool's claim line,
        # `cd WORKDIR && exec ...`.) The image needs /bin/sh for this.
        args = ["/bin/sh", "-c", CHDIR_SHIM, "sh", cwd, *args]
        cwd = "/"

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if options.network is NetworkMode.SANDBOX:
        # A namespace prepared by the network provider (the Manager passes
        # its path); without one, a placeholder so the spec can be inspected.
        namespaces.append({"type": "network", "path": netns_path or "/nonexistent/netns"})
    elif options.network is not NetworkMode.HOST:
        namespaces.append({"type": "network"})

    resources_spec: dict = {"pids": {"limit": host_pids_limit(res.max_pids)}}
    if res.memory_mb:
        resources_spec["memory"] = {"limit": res.memory_mb * 1024 * 1024}
    if res.cpus:
        resources_spec["cpu"] = {
            "quota": max(1000, math.ceil(res.cpus * CPU_PERIOD_US)),
            "period": CPU_PERIOD_US,
        }

    linux: dict = {"namespaces": namespaces, "resources": resources_spec}
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path

    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": RLIMIT_NOFILE, "soft": RLIMIT_NOFILE},
                # gVisor enforces RLIMIT_NPROC itself: fork bombs stop here,
                # long before the host pids cgroup (see host_pids_limit).
                {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc},
            ],
            "noNewPrivileges": True,
        },
        "root": {
            "path": options.rootfs or root_path or "rootfs",
            "readonly": options.read_only_rootfs,
        },
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }
