"""Stop signals for the server's whole life: the first one stops, none aborts the clean-up.

Why not `anyio.open_signal_receiver` around the serving task: when that
context exits (the first SIGINT cancels the task group it lives in), asyncio
puts the signal's disposition back to the default, and the clean-up that
runs next (kill sandboxes, unmount workspaces) is then killed by the
client's second signal. Claude Code ends a server with SIGINT and, 100 ms
later, SIGTERM: that pair left a mounted workspace and its loop device
behind on every `claude mcp list` (issue 14, finding 9). Before serving,
the canary ran with no handler at all, so SIGTERM there left its sandbox.

So `Signals.install()` is the first thing `serve` does, and its handlers
stay until the process exits: SIGINT and SIGTERM request a stop once (later
ones are counted and logged, never acted on), SIGHUP asks for a reload
(ignored once stopping). The handlers only set flags and wake the event
loop; `guard()` turns a stop request into cancelling the guarded work, whose
clean-up is shielded where it lives (runtime(), Manager.close()).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import structlog

log = structlog.get_logger("gvisor_mcp.lifecycle")

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Signals:
    """Process-wide: installed once, never restored to the default while serving."""

    def __init__(self) -> None:
        self.stop_requested: str | None = None
        """The name of the first stop signal (or "stdin closed"), once one came."""
        self.ignored = 0
        """Stop signals that arrived while already stopping."""
        self._reloads = 0
        self._reloads_done = 0
        self._wake: Callable[[], None] | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    @staticmethod
    def finished() -> None:
        """Clean-up is done: block the signals for the rest of the exit. (Python's
        finalisation restores their default action, and a SIGTERM arriving
        then would turn a clean exit 0 into death by signal.)"""
        signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, signal.SIGHUP})

    # Signal handlers run in the main thread between bytecodes: no logging here
    # (a write to stderr interrupted by another would raise a reentrant-call
    # error), only flags and a wake-up of the event loop.

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_requested is None:
            self.stop_requested = signal.Signals(signum).name
        else:
            self.ignored += 1
        self._poke()

    def _on_reload(self, _signum: int, _frame: Any) -> None:
        if self.stop_requested is None:
            self._reloads += 1
            self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake()

    async def guard(self, work: Callable[[], Awaitable[T]], on_reload: Callable[[], object] | None = None) -> T | None:
        """Run `work` until it returns or a stop signal comes (then cancel it and
        return None once its clean-up is done). SIGHUP calls `on_reload`."""
        if self.stop_requested is not None:
            return None
        result: list[T] = []
        loop = asyncio.get_running_loop()
        async with anyio.create_task_group() as tg:
            changed = anyio.Event()

            def wake() -> None:
                loop.call_soon_threadsafe(changed.set)

            async def watch() -> None:
                nonlocal changed
                seen_ignored = self.ignored
                while True:
                    await changed.wait()
                    changed = anyio.Event()
                    if self.stop_requested is not None:
                        if seen_ignored != self.ignored:
                            log.info("signal_ignored_while_stopping", count=self.ignored - seen_ignored)
                            seen_ignored = self.ignored
                        if not work_scope.cancel_called:
                            log.info("signal", signal=self.stop_requested)
                            work_scope.cancel()
                        continue
                    while on_reload is not None and self._reloads_done < self._reloads:
                        self._reloads_done += 1
                        try:
                            on_reload()
                        except Exception:
                            log.exception("reload_failed")

            async def run_work() -> None:
                with work_scope:
                    result.append(await work())
                tg.cancel_scope.cancel()

            work_scope = anyio.CancelScope()
            self._wake = wake
            tg.start_soon(watch)
            tg.start_soon(run_work)
            if self.stop_requested is not None or self._reloads_done < self._reloads:
                wake()  # a signal that came between the check above and here
        self._wake = None
        return result[0] if result else None
