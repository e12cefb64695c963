"""FakeManager: the one stand-in of the fast tests.

What it fakes: the sandbox Manager (gvisor_mcp.sandbox), i.e. booting a gVisor
container and running a command in it. Why: runsc cannot run without root,
and the fast tests must run anywhere, as any user, in seconds. Everything
above the Manager is real in these tests: the policy, Jobs, the SQLite result
store, the audit log, the MCP server and its tools, the stdio reader, the
HTTP gateway.

It never runs anything: each command's outcome is scripted by the test
(`fake.script(command, ...)`), or follows two built-in rules (`echo TEXT`
prints TEXT; anything else exits 127 saying it has no script). Output goes
through the real BoundedCapture, so truncation flags and counts are the
Manager's own; the caller's writers get the chunks as a real run streams
them. It implements what the runtime calls on a Manager (the ManagerAPI
protocol, sandbox/api.py; tests/fast/test_fake.py checks it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import anyio

from gvisor_mcp.sandbox import (
    ContainerOptions,
    ContainerResult,
    ContainerStatus,
    InvalidOptionsError,
    ManagerClosedError,
    ManagerConfig,
)
from gvisor_mcp.sandbox.output import BoundedCapture


@dataclass
class FakeRun:
    """How one scripted command ends."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    status: ContainerStatus = ContainerStatus.EXITED
    block: bool = False
    """Run until killed (cancel_command, shutdown) or cancelled: a long command."""
    chunk: int = 64 * 1024
    """Output is streamed to the writers in chunks of this size."""
    peak_memory_bytes: int = 12 * 1024 * 1024
    error: str | None = None
    raises: BaseException | None = None
    """Raised by run() instead of a result (an infrastructure failure)."""


@dataclass
class FakeContainer:
    """A run in flight, as Manager.active_run() shows it."""

    container_id: str
    options: ContainerOptions
    killed: anyio.Event = field(default_factory=anyio.Event)
    reason: ContainerStatus = ContainerStatus.KILLED


class FakeManager:
    """A Manager that runs nothing (see the module docstring): scripted outcomes,
    the real capacity bookkeeping the runtime reads, and a record of every run
    (`runs`: the ContainerOptions the policy resolved, as the sandbox got them)."""

    def __init__(self, config: ManagerConfig | None = None) -> None:
        self.config = config or ManagerConfig(max_concurrent_containers=4)
        self.closed = False
        self.runs: list[ContainerOptions] = []
        self.warmed: list[tuple[ContainerOptions, int]] = []
        self.scripts: dict[str, FakeRun] = {}
        self._active: dict[str, FakeContainer] = {}
        self._ids = itertools.count(1)
        self._limiter = anyio.CapacityLimiter(self.config.max_concurrent_containers)

    def script(self, command: str, **outcome: object) -> FakeRun:
        """How `command` (the shell text of execute_command) ends from now on."""
        run = FakeRun(**outcome)  # type: ignore[arg-type]  # FakeRun's own fields, checked at call
        self.scripts[command] = run
        return run

    # --- what the runtime calls (ManagerAPI) -----------------------------------------

    def active_containers(self) -> int:
        return len(self._active)

    def idle_pooled(self) -> int:
        return 0

    def frozen_pooled(self) -> int:
        return 0

    def active_run(self, run_id: str) -> FakeContainer | None:
        return self._active.get(run_id)

    def warm(self, template: ContainerOptions, size: int) -> None:
        self.warmed.append((template, size))

    async def cleanup_stale(self) -> int:
        return 0

    async def kill(self, run_id: str, reason: ContainerStatus = ContainerStatus.KILLED) -> bool:
        c = self._active.get(run_id)
        if c is None:
            return False
        c.reason = reason
        c.killed.set()
        return True

    async def close(self) -> None:
        self.closed = True
        for c in list(self._active.values()):
            c.killed.set()

    async def run(self, options: ContainerOptions, *, run_id: str | None = None) -> ContainerResult:
        if self.closed:
            raise ManagerClosedError()
        options.validate()
        if run_id is not None and run_id in self._active:
            raise InvalidOptionsError("run_id", run_id, "an id not already running")
        self.runs.append(options)
        outcome = self._outcome(options.command)
        if outcome.raises is not None:
            raise outcome.raises
        res = options.resources.merged_over(self.config.default_resources)
        async with self._limiter:
            c = FakeContainer(f"fake-{next(self._ids):04d}", options)
            rid = run_id or c.container_id
            self._active[rid] = c
            try:
                return await self._play(c, outcome, res.max_output_bytes or 0)
            finally:
                del self._active[rid]

    # --- internals -------------------------------------------------------------------

    def _outcome(self, argv: tuple[str, ...]) -> FakeRun:
        text = argv[2] if len(argv) == 3 and argv[1] == "-c" else " ".join(argv)
        if text in self.scripts:
            return self.scripts[text]
        if text.startswith("echo "):
            return FakeRun(stdout=text[5:].encode() + b"\n")
        return FakeRun(stderr=f"fake: no script for {text!r}\n".encode(), exit_code=127)

    async def _play(self, c: FakeContainer, outcome: FakeRun, limit: int) -> ContainerResult:
        out = BoundedCapture(limit, c.options.stdout_writer)
        err = BoundedCapture(limit, c.options.stderr_writer)
        for data, capture in ((outcome.stdout, out), (outcome.stderr, err)):
            for i in range(0, len(data), outcome.chunk):
                await capture.feed(data[i : i + outcome.chunk])
        status, exit_code, signal = outcome.status, outcome.exit_code, None
        if outcome.block:
            await c.killed.wait()
        if c.killed.is_set():
            status, exit_code, signal = c.reason, 128 + 9, 9
        return ContainerResult(
            container_id=c.container_id,
            exit_code=exit_code,
            signal=signal,
            status=status,
            stdout=out.value(),
            stderr=err.value(),
            stdout_bytes=out.total,
            stderr_bytes=err.total,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            oom_killed=status is ContainerStatus.OOM_KILLED,
            peak_memory_bytes=outcome.peak_memory_bytes,
            duration=0.01,
            boot_duration=0.005,
            error=outcome.error,
        )
