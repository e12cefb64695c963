from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from gvisor_mcp.sandbox import InvalidOptionsError, Manager, ManagerConfig
from gvisor_mcp.sandbox.container import mountpoints_of, spare_shape
from gvisor_mcp.sandbox.pool import pool_key

from ..conftest import CGROUP_PARENT, leftovers


def make_config(base, **kw) -> ManagerConfig:
    return ManagerConfig(
        bundle_base_dir=str(base / "bundles"),
        runsc_root=str(base / "runsc"),
        cgroup_parent=CGROUP_PARENT,
        platform=os.environ.get("GVISOR_MCP_PLATFORM", "systrap"),
        **kw,
    )


class WarmManager:
    """The same Manager, but every poolable run is served by the warm pool:
    the pool for the run's key is filled first, and the result must say warm.
    So each integration test checks a warm hit behaves exactly like a cold run."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager

    def __getattr__(self, name):
        return getattr(self._m, name)

    async def run(self, options, **kw):
        try:
            key = pool_key(options, self._m.prepare(options))
        except InvalidOptionsError:
            key = None
        if key is None:
            return await self._m.run(options, **kw)
        self._m.warm(options, 1)
        assert await self._m.wait_warm(options), "the pool did not fill"
        try:
            result = await self._m.run(options, **kw)
        finally:
            self._m.warm(options, 0)
        assert result.warm, result.summary()
        return result


class SpareManager:
    """The same Manager, but every cold run of the common shape is served by
    a started spare (sandbox/spares.py: its launcher started ahead, joined
    to its cgroup leaf): one is made for the run's key first, and the run
    must have taken a spare's id."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager

    def __getattr__(self, name):
        return getattr(self._m, name)

    async def run(self, options, **kw):
        host = self._m._entered.host
        shape = spare_shape(host, options)
        if shape is None:
            return await self._m.run(options, **kw)
        await host.spares.refill(mountpoints_of(options), shape)
        spares = host.spares.names()
        result = await self._m.run(options, **kw)
        assert result.container_id in spares and not result.warm, (result.container_id, spares)
        return result


@contextlib.asynccontextmanager
async def running_manager(config: ManagerConfig):
    """`async with Manager(...)`, held by a task of its own.

    pytest-asyncio runs a fixture's setup and teardown in different tasks
    (pytest-asyncio issue 1191), and a task group (the Manager's) must be
    entered and exited in one task; a test body can use `async with
    Manager(...)` directly.
    """
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with Manager(config) as m:
                ready.set_result(m)
                await stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    task = asyncio.create_task(hold())
    try:
        yield await ready
    finally:
        stop.set()
        await task


@pytest.fixture(params=["cold", "warm"])
async def manager(request, sandbox_base):
    async with running_manager(make_config(sandbox_base)) as m:
        yield m if request.param == "cold" else WarmManager(m)
    assert leftovers(sandbox_base) == {}
