"""build_spec golden checks and the cgroup v2 mapping."""

from __future__ import annotations

import pytest

from gvisor_mcp.sandbox import (
    CgroupV2Entry,
    ContainerOptions,
    InvalidOptionsError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
    build_spec,
    to_cgroup_v2_entries,
)
from gvisor_mcp.sandbox.spec import CHDIR_SHIM, ROOT_CAPS, check_workdir, host_pids_limit


def spec(**kw):
    kw.setdefault("command", ["echo", "hi"])
    return build_spec(ContainerOptions(**kw), root_path="/b/rootfs", etc_dir="/b/etc", cgroups_path="/gvisor-mcp/gm-x")


def test_minimal_capabilities_and_no_new_privileges():
    s = spec()
    caps = s["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    assert all(v == ROOT_CAPS for v in caps.values())
    assert "CAP_SYS_ADMIN" not in ROOT_CAPS
    assert s["process"]["noNewPrivileges"] is True
    s = spec(user=UserSpec(uid=1000, gid=1000))
    assert all(v == [] for v in s["process"]["capabilities"].values())
    assert s["process"]["user"] == {"uid": 1000, "gid": 1000}


def test_read_only_root_when_asked():
    assert spec()["root"] == {"path": "/b/rootfs", "readonly": False}
    assert spec(read_only_rootfs=True)["root"]["readonly"] is True


def test_network_namespace_unless_host():
    for mode in (NetworkMode.NONE, NetworkMode.SANDBOX):
        ns = {n["type"] for n in spec(network=mode)["linux"]["namespaces"]}
        assert ns == {"pid", "ipc", "uts", "mount", "network"}
    ns = {n["type"] for n in spec(network=NetworkMode.HOST)["linux"]["namespaces"]}
    assert "network" not in ns


def test_resources_and_cgroup_path():
    s = spec(resources=ResourceSpec(cpus=0.5, memory_mb=256, max_pids=64))
    lin = s["linux"]
    assert lin["cgroupsPath"] == "/gvisor-mcp/gm-x"
    assert lin["resources"]["memory"] == {"limit": 256 << 20}
    assert lin["resources"]["cpu"] == {"quota": 50_000, "period": 100_000}
    assert lin["resources"]["pids"] == {"limit": host_pids_limit(64)}
    nproc = [r for r in s["process"]["rlimits"] if r["type"] == "RLIMIT_NPROC"]
    assert nproc == [{"type": "RLIMIT_NPROC", "hard": 64, "soft": 64}]


def test_default_image_mounts_no_host_secrets():
    s = spec()
    dests = {m["destination"]: m for m in s["mounts"]}
    assert dests["/etc"]["source"] == "/b/etc"
    for d in ("/root", "/home", "/var", "/run"):
        assert d not in dests
    for m in s["mounts"]:
        if m["type"] == "bind":
            assert "ro" in m["options"] and "nosuid" in m["options"]
            assert m["source"] != "/etc"
    assert any(o.startswith("size=") for o in dests["/tmp"]["options"])


def test_extra_mounts_and_env():
    s = spec(
        env={"FOO": "1", "PATH": "/x"},
        extra_mounts=[
            Mount(destination="/w", source="/srv/w", read_only=False),
            Mount(destination="/t", type="tmpfs", size_mb=8),
        ],
    )
    dests = {m["destination"]: m for m in s["mounts"]}
    assert "rw" in dests["/w"]["options"]
    assert "size=8m" in dests["/t"]["options"] and "ro" in dests["/t"]["options"]
    assert "FOO=1" in s["process"]["env"] and "PATH=/x" in s["process"]["env"]


def test_custom_rootfs_has_no_default_image_mounts_but_the_same_tmp(tmp_path):
    s = build_spec(ContainerOptions(command=["true"], rootfs=str(tmp_path)))
    assert s["root"]["path"] == str(tmp_path)
    assert {m["destination"] for m in s["mounts"]} == {"/proc", "/dev", "/sys", "/tmp"}
    tmp = next(m for m in s["mounts"] if m["destination"] == "/tmp")
    assert tmp["type"] == "tmpfs" and "size=256m" in tmp["options"]


def test_an_image_directory_never_gets_a_cwd_or_mount_point_made_by_runsc(tmp_path):
    """runsc creates a missing cwd, and a missing bind mount point, inside the
    image directory on the host: runs start in / and change directory inside,
    and a bind whose mount point the image lacks is refused."""
    (tmp_path / "workspace").mkdir()
    (tmp_path / "srv").mkdir()
    opts = ContainerOptions(
        command=["true"],
        rootfs=str(tmp_path),
        workdir="/srv",
        extra_mounts=[Mount(destination="/workspace", source=str(tmp_path))],
    )
    check_workdir(opts)
    s = build_spec(opts)
    assert s["process"]["cwd"] == "/" and s["process"]["args"][:5] == ["/bin/sh", "-c", CHDIR_SHIM, "sh", "/srv"]
    missing = opts.model_copy(update={"extra_mounts": (Mount(destination="/data", source=str(tmp_path)),)})
    with pytest.raises(InvalidOptionsError, match="mount.destination='/data'.*exists in the image"):
        check_workdir(missing)
    assert not (tmp_path / "data").exists()


def test_no_annotations_or_devices_from_options():
    s = spec()
    assert "annotations" not in s
    assert "devices" not in s["linux"]


def test_check_workdir(tmp_path):
    check_workdir(ContainerOptions(command=["true"], workdir="/tmp"))
    check_workdir(ContainerOptions(command=["true"], workdir="/usr/bin"))
    (tmp_path / "sub").mkdir()
    check_workdir(
        ContainerOptions(
            command=["true"], workdir="/w/sub", extra_mounts=[Mount(destination="/w", source=str(tmp_path))]
        )
    )
    for bad in ("/nope", "/tmp/sub", "/usr/nonexistent-dir"):
        with pytest.raises(InvalidOptionsError, match="workdir"):
            check_workdir(ContainerOptions(command=["true"], workdir=bad))


def test_to_cgroup_v2_entries():
    entries = to_cgroup_v2_entries(ResourceSpec(cpus=1.5, memory_mb=512, max_pids=100))
    assert entries == [
        CgroupV2Entry(file="memory.max", value=str(512 << 20)),
        CgroupV2Entry(file="memory.swap.max", value="0"),
        CgroupV2Entry(file="cpu.max", value="150000 100000"),
        CgroupV2Entry(file="pids.max", value=str(host_pids_limit(100))),
    ]
    assert [e.file for e in to_cgroup_v2_entries(ResourceSpec())] == ["pids.max"]
