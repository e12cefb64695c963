"""Resumable streamable HTTP: the SDK's EventStore, in memory, bounded, one partition per session.

With an event store the SDK's transport gives every SSE event an id, opens
each stream with a priming event (an id, empty data, and a `retry` field:
RETRY_MS), and answers a GET carrying `Last-Event-ID` with the events of
that stream after it, then the rest live. So a client whose connection
drops during a long `execute_command` gets its result on reconnecting
instead of losing it (the SDK's client does this by itself).

Why in memory: events only matter while a client is reconnecting (seconds),
and a restart ends every session anyway (their ids are not persisted), so
a durable store would keep nothing a client could use. Why bounded: each
stored event is a JSON-RPC message (a progress notification, a result of
up to the output excerpt); without a bound a client that never reads would
grow the server. Bounds: MAX_SESSION_BYTES per session (its oldest events
go first) and MAX_TOTAL_BYTES for the process (the oldest events of any
session go first); a session's events are dropped when it ends. A
reconnect naming an event no longer held is refused by the Gateway with a
400 that says to poll with `list_active` / `inspect_result` instead.

Why partitions: the SDK's stream ids are JSON-RPC request ids, which every
session numbers from 1, and one store serves all sessions. The Gateway
runs each request under its session's partition key (a context variable,
which the SDK's session task inherits from the request that opened it), so
a `Last-Event-ID` replays only events of the session that presents it.
Event ids are 128-bit random strings: not guessable either.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage

RETRY_MS = 1000
"""The SSE `retry` the priming event suggests: how long a client waits before reconnecting."""
MAX_SESSION_BYTES = 1 << 20
MAX_TOTAL_BYTES = 64 << 20
_OVERHEAD = 64
"""Bytes counted per event beyond its JSON (ids, bookkeeping)."""

_partition: contextvars.ContextVar[str | None] = contextvars.ContextVar("gvisor_mcp_event_partition", default=None)


@contextlib.contextmanager
def partition(key: str) -> Iterator[None]:
    """Run a request (and any session task it starts) under session partition `key`."""
    token = _partition.set(key)
    try:
        yield
    finally:
        _partition.reset(token)


@dataclass(frozen=True)
class _Event:
    partition: str
    stream_id: StreamId
    message: JSONRPCMessage | None
    size: int


class BoundedEventStore(EventStore):
    def __init__(self, max_session_bytes: int = MAX_SESSION_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        self.max_session_bytes = max_session_bytes
        self.max_total_bytes = max_total_bytes
        self._all: OrderedDict[EventId, _Event] = OrderedDict()
        self._by_partition: dict[str, OrderedDict[EventId, _Event]] = {}
        self._bytes: dict[str, int] = {}
        self.total_bytes = 0

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        key = _partition.get() or ""
        size = _OVERHEAD + (len(message.model_dump_json(by_alias=True, exclude_unset=True)) if message else 0)
        event_id = secrets.token_urlsafe(16)
        event = _Event(key, stream_id, message, size)
        self._all[event_id] = event
        self._by_partition.setdefault(key, OrderedDict())[event_id] = event
        self._bytes[key] = self._bytes.get(key, 0) + size
        self.total_bytes += size
        mine = self._by_partition[key]
        while self._bytes[key] > self.max_session_bytes and len(mine) > 1:
            self._drop(next(iter(mine)))
        while self.total_bytes > self.max_total_bytes and len(self._all) > 1:
            self._drop(next(iter(self._all)))
        return event_id

    def holds(self, event_id: str) -> bool:
        """Whether `event_id` is held for the current request's session."""
        event = self._all.get(event_id)
        return event is not None and event.partition == (_partition.get() or "")

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        key = _partition.get() or ""
        last = self._all.get(last_event_id)
        if last is None or last.partition != key:
            return None
        after = False
        # A snapshot: sending awaits, and new events may be stored meanwhile (they go out live).
        for event_id, event in list(self._by_partition.get(key, {}).items()):
            if after and event.stream_id == last.stream_id and event.message is not None:
                await send_callback(EventMessage(event.message, event_id))
            after = after or event_id == last_event_id
        return last.stream_id

    def forget(self, key: str) -> None:
        """The session `key` ended: drop its events."""
        for event_id in list(self._by_partition.get(key, {})):
            self._drop(event_id)

    def _drop(self, event_id: EventId) -> None:
        event = self._all.pop(event_id)
        mine = self._by_partition[event.partition]
        del mine[event_id]
        self._bytes[event.partition] -= event.size
        self.total_bytes -= event.size
        if not mine:
            del self._by_partition[event.partition]
            del self._bytes[event.partition]
