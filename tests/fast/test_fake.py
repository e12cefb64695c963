"""The FakeManager must not drift from the Manager it stands in for."""

from __future__ import annotations

import inspect

from gvisor_mcp.sandbox import Manager
from gvisor_mcp.sandbox.api import ManagerAPI

from .fakes import FakeManager

RUNTIME_CALLS = [name for name in dir(ManagerAPI) if not name.startswith("_")]
"""What the layers above call on a Manager (jobs, runtime, tools): sandbox/api.py."""


def test_the_fake_has_the_managers_signatures():
    for name in RUNTIME_CALLS:
        if isinstance(getattr(ManagerAPI, name), property):
            continue  # config, closed: attributes on the fake
        real, fake = getattr(Manager, name), getattr(FakeManager, name)
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(fake), name
        assert list(inspect.signature(real).parameters) == list(inspect.signature(fake).parameters), name
    assert isinstance(FakeManager(), ManagerAPI)
    assert isinstance(FakeManager().closed, bool) and isinstance(Manager().closed, bool)
