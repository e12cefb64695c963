"""BoundedCapture: head + tail within the cap, every byte counted."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvisor_mcp.sandbox.output import BoundedCapture


def capture(chunks, limit):
    seen = []
    cap = BoundedCapture(limit, writer=seen.append)

    async def go():
        for c in chunks:
            await cap.feed(c)

    anyio.run(go)
    return cap, seen


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(min_value=0, max_value=700))
def test_head_and_tail_property(chunks, limit):
    data = b"".join(chunks)
    cap, seen = capture(chunks, limit)
    assert cap.total == len(data)
    assert b"".join(seen) == data
    assert cap.truncated == (len(data) > limit)
    if len(data) <= limit:
        assert cap.value() == data
    else:
        head = limit // 2
        tail = limit - head
        assert cap.value() == data[:head] + (data[-tail:] if tail else b"")


def test_memory_stays_bounded_on_many_chunks():
    cap = BoundedCapture(1000)

    async def go():
        for _ in range(10_000):
            await cap.feed(b"x" * 37)

    anyio.run(go)
    assert cap.total == 370_000
    assert sum(len(c) for c in cap._tail) < 1000 + 37


async def test_async_writer_is_awaited():
    got = []

    async def w(chunk):
        got.append(chunk)

    cap = BoundedCapture(10, writer=w)
    await cap.feed(b"abc")
    assert got == [b"abc"]
