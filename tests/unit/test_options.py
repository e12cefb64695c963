"""Validation: every bad input names the field, the value and what is allowed."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from gvisor_mcp.sandbox import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_PIDS,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT,
    MAX_CONTAINER_NAME_LEN,
    ContainerOptions,
    InvalidOptionsError,
    Mount,
    NetworkMode,
    ResourceSpec,
    UserSpec,
    validate_resources,
)


def test_constants():
    assert DEFAULT_TIMEOUT == 120
    assert DEFAULT_MEMORY_MB == 512
    assert DEFAULT_MAX_PIDS == 1024
    assert DEFAULT_MAX_OUTPUT == 10 * 1024 * 1024
    assert MAX_CONTAINER_NAME_LEN == 64


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(command=[]), "command"),
        (dict(command=[""]), "command"),
        (dict(command="echo hi"), "a list of arguments"),
        (dict(command=["echo", "a\x00b"]), "command[1]"),
        (dict(command=["true"], workdir="tmp"), "workdir='tmp'"),
        (dict(command=["true"], workdir="/a/../etc"), "'..'"),
        (dict(command=["true"], workdir="/a\x00"), "NUL"),
        (dict(command=["true"], env={"A=B": "x"}), "env key='A=B'"),
        (dict(command=["true"], env={"1A": "x"}), "env key"),
        (dict(command=["true"], env={"A": "x\x00y"}), "env[A]"),
        (dict(command=["true"], network="bridge"), "network"),
        (dict(command=["true"], rootfs="relative/dir"), "rootfs='relative/dir'"),
        (dict(command=["true"], stdin=12), "stdin"),
        (dict(command=["true"], extra_mounts=[dict(destination="rel", source="/tmp")]), "mount.destination='rel'"),
        (dict(command=["true"], extra_mounts=[dict(destination="/proc/x", source="/tmp")]), "outside /proc"),
        (dict(command=["true"], extra_mounts=[dict(destination="/x", source="tmp")]), "mount.source"),
        (dict(command=["true"], extra_mounts=[dict(destination="/x", type="overlay")]), "mount.type"),
        (
            dict(
                command=["true"],
                extra_mounts=[dict(destination="/x", source="/a"), dict(destination="/x", source="/b")],
            ),
            "at most once",
        ),
        (dict(command=["x"] * 5000), "at most 4096 arguments"),
        (dict(command=["true"], env={f"K{i}": "v" for i in range(2000)}), "at most 1024 variables"),
    ],
)
def test_bad_options_are_named(kwargs, needle):
    with pytest.raises(ValidationError) as e:
        ContainerOptions(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("cpus", -1, "resources.cpus=-1"),
        ("cpus", float("nan"), "finite"),
        ("cpus", 5000, "0 to 1,024"),
        ("cpus", 0.001, "at least 0.01"),
        ("memory_mb", -5, "resources.memory_mb=-5"),
        ("memory_mb", 8, "at least 16 MiB"),
        ("memory_mb", 10**9, "0 to 1,048,576"),
        ("max_pids", -1, "max_pids"),
        ("max_pids", 2, "at least 4"),
        ("timeout", -1, "timeout"),
        ("timeout", float("inf"), "finite"),
        ("max_output_bytes", -1, "max_output_bytes"),
        ("max_output_bytes", 1 << 40, "max_output_bytes"),
    ],
)
def test_bad_resources(field, value, needle):
    with pytest.raises(ValidationError) as e:
        ResourceSpec(**{field: value})
    assert needle in str(e.value)


def test_validate_resources_raises_structured_error():
    res = ResourceSpec.model_construct(cpus=-2.0, memory_mb=0, max_pids=0, timeout=0.0, max_output_bytes=0)
    with pytest.raises(InvalidOptionsError) as e:
        validate_resources(res)
    assert e.value.field == "resources.cpus" and e.value.value == -2.0
    assert "0 to" in e.value.allowed


def test_good_options_normalise():
    o = ContainerOptions(
        command=["echo", "hi"],
        workdir="/tmp/",
        env={"A_B": "1"},
        stdin="text",
        network="host",
        resources=ResourceSpec(timeout=dt.timedelta(seconds=90), cpus=0.5),
        user=UserSpec.parse("1000:100"),
    )
    assert o.command == ("echo", "hi")
    assert o.workdir == "/tmp"
    assert o.stdin == b"text"
    assert o.network is NetworkMode.HOST
    assert o.resources.timeout == 90.0
    assert (o.user.uid, o.user.gid) == (1000, 100)
    assert UserSpec.parse("7") == UserSpec(uid=7, gid=7)


def test_user_parse_errors():
    with pytest.raises(InvalidOptionsError, match="UID"):
        UserSpec.parse("root")
    with pytest.raises(InvalidOptionsError):
        UserSpec.parse("-1:0")


def test_merged_over_fills_zeros_only():
    d = ResourceSpec(cpus=1, memory_mb=512, max_pids=100, timeout=10, max_output_bytes=1000)
    m = ResourceSpec(memory_mb=64).merged_over(d)
    assert (m.cpus, m.memory_mb, m.max_pids, m.timeout, m.max_output_bytes) == (1, 64, 100, 10, 1000)


def test_check_paths(tmp_path):
    ContainerOptions(command=["true"], rootfs=str(tmp_path)).check_paths()
    with pytest.raises(InvalidOptionsError, match="rootfs"):
        ContainerOptions(command=["true"], rootfs=str(tmp_path / "nope")).check_paths()
    with pytest.raises(InvalidOptionsError, match="mount.source"):
        ContainerOptions(
            command=["true"], extra_mounts=[Mount(destination="/d", source=str(tmp_path / "x"))]
        ).validate()


def test_options_are_frozen():
    o = ContainerOptions(command=["true"])
    with pytest.raises(ValidationError):
        o.workdir = "/etc"  # type: ignore[misc]
