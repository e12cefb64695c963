"""The FakeManager must not drift from the Manager it stands in for."""

from __future__ import annotations

import inspect

from gvisor_mcp.sandbox import Manager

from .fakes import FakeManager

RUNTIME_CALLS = ("active_containers", "idle_pooled", "active_run", "run", "warm", "kill", "cleanup_stale", "close")
"""What the layers above call on a Manager (jobs, runtime, tools)."""


def test_the_fake_has_the_managers_signatures():
    for name in RUNTIME_CALLS:
        if not hasattr(Manager, name):
            continue  # not on this Manager (yet)
        real, fake = getattr(Manager, name), getattr(FakeManager, name)
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(fake), name
        assert list(inspect.signature(real).parameters) == list(inspect.signature(fake).parameters), name
    assert isinstance(FakeManager().closed, bool) and isinstance(Manager().closed, bool)
