from __future__ import annotations

import os

import pytest

from gvisor_mcp.sandbox import Manager, ManagerConfig

from ..conftest import CGROUP_PARENT, leftovers


def make_config(base, **kw) -> ManagerConfig:
    return ManagerConfig(
        bundle_base_dir=str(base / "bundles"),
        runsc_root=str(base / "runsc"),
        cgroup_parent=CGROUP_PARENT,
        platform=os.environ.get("GVISOR_MCP_PLATFORM", "systrap"),
        **kw,
    )


@pytest.fixture
async def manager(sandbox_base):
    m = Manager(make_config(sandbox_base))
    yield m
    await m.close()
    assert leftovers(sandbox_base) == {}
