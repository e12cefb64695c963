"""The sandbox package's contract that needs no runsc: the error family, the
status type, and Manager as an `async with` resource only."""

from __future__ import annotations

import json

import pytest

from gvisor_mcp.sandbox import (
    ContainerOptions,
    ContainerResult,
    ContainerStatus,
    InvalidOptionsError,
    Manager,
    ManagerClosedError,
    ManagerConfig,
    RunscError,
    SandboxBaseError,
    SandboxError,
    SandboxRefusal,
)
from gvisor_mcp.sandbox.doctor import host_checks


def test_one_error_family_with_refusals_and_infrastructure_failures():
    for cls in (InvalidOptionsError, ManagerClosedError):
        assert issubclass(cls, SandboxRefusal) and not issubclass(cls, SandboxError)
    assert issubclass(RunscError, SandboxError)
    for cls in (SandboxRefusal, SandboxError):
        assert issubclass(cls, SandboxBaseError)
    # What callers caught before keeps working.
    assert issubclass(InvalidOptionsError, ValueError)
    assert issubclass(ManagerClosedError, RuntimeError) and issubclass(SandboxError, RuntimeError)


def test_status_values_are_the_wire_strings():
    assert [s.value for s in ContainerStatus] == [
        "running",
        "exited",
        "timed_out",
        "oom_killed",
        "killed",
        "error",
        "host_lost",
    ]
    assert str(ContainerStatus.TIMED_OUT) == "timed_out" == f"{ContainerStatus.TIMED_OUT}"
    assert json.dumps({"status": ContainerStatus.KILLED}) == '{"status": "killed"}'
    assert ContainerStatus("oom_killed") is ContainerStatus.OOM_KILLED


def test_a_result_is_never_running():
    with pytest.raises(ValueError, match="running"):
        ContainerResult(container_id="x", exit_code=0, status=ContainerStatus.RUNNING)


async def test_a_manager_outside_async_with_touches_nothing_and_says_how_to_use_it(tmp_path):
    config = ManagerConfig(bundle_base_dir=str(tmp_path / "b"), runsc_root=str(tmp_path / "r"))
    m = Manager(config)  # no runsc, root or cgroups needed to build one
    assert not (tmp_path / "b").exists()
    with pytest.raises(RuntimeError, match="async with"):
        await m.run(ContainerOptions(command=["true"]))
    with pytest.raises(RuntimeError, match="async with"):
        await m.cleanup_stale()
    assert not (tmp_path / "b").exists()
    await m.close()
    with pytest.raises(ManagerClosedError):
        await m.run(ContainerOptions(command=["true"]))


async def test_doctor_names_a_missing_runsc_and_how_to_get_it():
    checks = {c.name: c for c in await host_checks(ManagerConfig(runsc_path="/nonexistent/runsc"))}
    assert not checks["runsc"].ok
    assert "not found" in checks["runsc"].detail and "setup.sh" in checks["runsc"].detail
    assert "runsc version" not in checks
    assert checks["platform"].ok


def test_manager_satisfies_the_protocol_the_runtime_is_written_against():
    from gvisor_mcp.sandbox import ManagerAPI

    assert isinstance(Manager(ManagerConfig()), ManagerAPI)


def test_sandbox_errors_slot_under_the_package_family():
    from gvisor_mcp.errors import GvisorMcpError, InfrastructureError, Refusal

    assert issubclass(SandboxBaseError, GvisorMcpError)
    assert issubclass(InvalidOptionsError, Refusal) and issubclass(ManagerClosedError, Refusal)
    assert issubclass(RunscError, InfrastructureError) and not issubclass(RunscError, Refusal)
