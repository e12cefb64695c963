"""Commands in flight, independent of the request that started them.

A tool call starts a Job and waits for it up to the policy's foreground limit;
past that (or with background=true) the call returns `running` and the job
goes on in the server's task group, reachable by inspect_result,
list_active and cancel_command. Every job ends in the result store, whatever
happens to the request, the client or the Manager.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from .audit import AuditLog
from .metrics import Metrics
from .network import ConnectionEvent, EgressGrant, EgressRules
from .results import ResultStore
from .sandbox import (
    ContainerOptions,
    ContainerResult,
    ContainerStatus,
    InvalidOptionsError,
    Manager,
    ManagerClosedError,
    RunscError,
    SandboxError,
)

log = structlog.get_logger("gvisor_mcp.jobs")


@dataclass
class Job:
    result_id: str
    tenant: str
    session: str | None
    command: str
    limits: dict[str, Any]
    timeout: float
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    done: anyio.Event = field(default_factory=anyio.Event)
    result: ContainerResult | None = None
    status: str = "running"
    error: str | None = None
    out_bytes: int = 0
    err_bytes: int = 0
    last_line: bytes = b""
    scope: anyio.CancelScope | None = None
    container_id: str | None = None
    """Known once a sandbox is assigned (a warm one may be claimed)."""
    holding: Any = None
    """What the run holds until it ends (its store image's lease), released in _finish."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono

    def seen(self, chunk: bytes, stream: str) -> None:
        if stream == "stdout":
            self.out_bytes += len(chunk)
        else:
            self.err_bytes += len(chunk)
        lines = chunk.rstrip(b"\n").rsplit(b"\n", 1)
        if lines[-1]:
            self.last_line = lines[-1][-200:]


class FairGate:
    """Sandbox slots shared by tenants; a freed slot goes to the waiting
    tenant that holds the fewest (ties: the one that waited longest).

    The Manager's own limiter is first-come-first-served: one tenant queueing
    many runs would make every other tenant wait behind all of them. Here a
    tenant with a backlog never delays another tenant's call by more than
    the next freed slot.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.held: dict[str, int] = {}
        self._queues: dict[str, deque[anyio.Event]] = {}

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _take(self, tenant: str) -> None:
        self.used += 1
        self.held[tenant] = self.held.get(tenant, 0) + 1

    async def acquire(self, tenant: str) -> None:
        if self.used < self.capacity and not self._queues:
            self._take(tenant)
            return
        ev = anyio.Event()
        self._queues.setdefault(tenant, deque()).append(ev)
        try:
            await ev.wait()
        except BaseException:
            if ev.is_set():  # the slot was handed over as we were cancelled
                self.release(tenant)
            else:
                q = self._queues.get(tenant)
                if q is not None and ev in q:
                    q.remove(ev)
                    if not q:
                        del self._queues[tenant]
            raise

    def release(self, tenant: str) -> None:
        self.used -= 1
        self.held[tenant] -= 1
        if not self.held[tenant]:
            del self.held[tenant]
        if not self._queues:
            return
        # dicts keep insertion order: min() picks the longest-waiting among equals
        nxt = min(self._queues, key=lambda t: self.held.get(t, 0))
        q = self._queues.pop(nxt)
        ev = q.popleft()
        if q:
            self._queues[nxt] = q  # to the back among equals
        self._take(nxt)
        ev.set()


class QuotaExceeded(Exception):
    """A tenant is at its concurrency or rate quota; the message names it."""


class Jobs:
    def __init__(
        self,
        manager: Manager,
        store: ResultStore,
        audit: AuditLog,
        task_group: anyio.abc.TaskGroup,
        metrics: Metrics | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.gate = FairGate(manager.config.max_concurrent_containers)
        self.store = store
        self.audit = audit
        self._tg = task_group
        self._jobs: dict[str, Job] = {}
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    def container_of(self, job: Job) -> str | None:
        run = self.manager.active_run(job.result_id)
        return run.container_id if run is not None else job.container_id

    def active_all(self) -> list[Job]:
        return list(self._jobs.values())

    def active(self, tenant: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.tenant == tenant]

    def get(self, result_id: str, tenant: str) -> Job | None:
        job = self._jobs.get(result_id)
        return job if job is not None and job.tenant == tenant else None

    def admit(self, tenant: str, max_concurrent: int | None, per_minute: int | None) -> None:
        """Raise QuotaExceeded when the tenant may not start another run now."""
        if max_concurrent is not None and len(self.active(tenant)) >= max_concurrent:
            raise QuotaExceeded(
                f"quota: tenant {tenant!r} already has {max_concurrent} command(s) running "
                f"(max_concurrent={max_concurrent}); wait for one to finish (inspect_result with "
                "wait_seconds) or cancel one (cancel_command), then retry"
            )
        if per_minute is not None:
            now = time.monotonic()
            recent = self._recent[tenant]
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(recent) >= per_minute:
                retry = 60 - (now - recent[0])
                raise QuotaExceeded(
                    f"quota: tenant {tenant!r} started {per_minute} commands in the last minute "
                    f"(runs_per_minute={per_minute}); retry in {retry:.0f} s"
                )
            recent.append(now)

    def start(
        self,
        *,
        tenant: str,
        session: str | None,
        command: str,
        options: ContainerOptions,
        limits: dict[str, Any],
        policy_hash: str | None = None,
        hold: Callable[[str], Any] | None = None,
    ) -> Job:
        """Start a job; `hold(result_id)` is called first (it may refuse by raising,
        before anything is recorded) and what it returns is released when the job ends."""
        rid = self.store.new_id()
        holding = hold(rid) if hold is not None else None
        cap = options.resources.merged_over(self.manager.config.default_resources).max_output_bytes
        job = Job(
            result_id=rid,
            tenant=tenant,
            session=session,
            command=command,
            limits=limits,
            timeout=options.resources.timeout or self.manager.config.default_resources.timeout,
            holding=holding,
        )
        self.store.start(
            rid, tenant=tenant, session=session, command=command, container_id=None, limits=limits
        )
        out_w = self.store.part_writer(rid, "stdout", cap)
        err_w = self.store.part_writer(rid, "stderr", cap)

        def on_out(chunk: bytes) -> None:
            job.seen(chunk, "stdout")
            out_w(chunk)

        def on_err(chunk: bytes) -> None:
            job.seen(chunk, "stderr")
            err_w(chunk)

        update: dict[str, Any] = {"stdout_writer": on_out, "stderr_writer": on_err}
        if isinstance(options.egress, EgressRules):
            # Every connection attempt of this run goes to the audit log and
            # the metrics, with the tenant and result id the proxy never sees.
            update["egress"] = EgressGrant(
                options.egress, on_event=lambda ev: self._egress_event(job, ev, policy_hash)
            )
        opts = options.model_copy(update=update)
        self._jobs[rid] = job
        self._tg.start_soon(self._run, job, opts, (out_w, err_w), policy_hash)
        return job

    async def _run(self, job: Job, options: ContainerOptions, writers: tuple, policy_hash: str | None) -> None:
        result: ContainerResult | None = None
        error: str | None = None
        status = "error"
        try:
            with anyio.CancelScope() as job.scope:
                await self.gate.acquire(job.tenant)
                try:
                    result = await self.manager.run(options, run_id=job.result_id)
                finally:
                    self.gate.release(job.tenant)
            if result is not None:
                status, error = result.status.value, result.error
                if result.status == ContainerStatus.KILLED and error is None and self.manager.closed:
                    error = "the server shut down while the command ran"
            else:  # cancel_command while it waited for a free slot
                status, error = "killed", "cancelled before a sandbox was free to run it"
        except ManagerClosedError:
            status, error = "killed", "the server shut down before the command could start"
        except InvalidOptionsError as e:
            error = str(e)
        except (SandboxError, RunscError) as e:
            error = f"sandbox failure: {e}"
        except anyio.get_cancelled_exc_class():
            status, error = "killed", "the server shut down while the command ran"
            with anyio.CancelScope(shield=True):
                self._finish(job, result, status, error, writers, policy_hash)
            raise
        except Exception as e:  # a bug must still end in a stored result
            log.exception("job_crashed", result_id=job.result_id)
            error = f"internal error: {type(e).__name__}"
        self._finish(job, result, status, error, writers, policy_hash)

    def _egress_event(self, job: Job, ev: ConnectionEvent, policy_hash: str | None) -> None:
        self.audit.write(
            event="egress",
            tenant=job.tenant,
            session=job.session,
            result_id=job.result_id,
            policy_hash=policy_hash,
            destination=ev.destination,
            method=ev.method,
            decision=ev.verdict,
            reason=ev.reason,
            address=ev.address,
            bytes_up=ev.bytes_up,
            bytes_down=ev.bytes_down,
            duration_ms=round(ev.duration * 1000),
        )
        if self.metrics is not None:
            self.metrics.egress(job.tenant, ev.verdict, ev.bytes_up, ev.bytes_down)

    def _finish(self, job, result, status, error, writers, policy_hash) -> None:  # type: ignore[no-untyped-def]
        for w in writers:
            w.close()
        if job.holding is not None:
            job.holding.release()
        fields: dict[str, Any] = {"error": error}
        if result is not None:
            job.container_id = result.container_id
            fields.update(
                container_id=result.container_id,
                exit_code=result.exit_code,
                signal=result.signal,
                duration_ms=round(result.duration * 1000),
                boot_ms=round(result.boot_duration * 1000),
                oom_killed=result.oom_killed,
                peak_memory_bytes=result.peak_memory_bytes,
                stdout_bytes=result.stdout_bytes,
                stderr_bytes=result.stderr_bytes,
                stdout_truncated=result.stdout_truncated,
                stderr_truncated=result.stderr_truncated,
                warm=result.warm,
                network=result.network,
            )
        else:
            fields.update(duration_ms=round(job.elapsed() * 1000))
        try:
            self.store.finish(
                job.result_id,
                status=status,
                stdout=result.stdout if result else b"",
                stderr=result.stderr if result else b"",
                fields=fields,
            )
            self.store.evict(job.tenant)
        except Exception:
            log.exception("store_finish_failed", result_id=job.result_id)
        self.audit.write(
            tenant=job.tenant,
            session=job.session,
            result_id=job.result_id,
            container_id=job.container_id,
            command=job.command,
            policy_hash=policy_hash,
            decision="allowed",
            status=status,
            exit_code=result.exit_code if result else None,
            duration_ms=fields.get("duration_ms"),
            boot_ms=fields.get("boot_ms"),
            error=error,
        )
        if self.metrics is not None:
            self.metrics.finished(
                job.tenant, status,
                warm=result.warm if result else None,
                boot=result.boot_duration if result else None,
                duration=result.duration if result else None,
            )
        job.result, job.status, job.error = result, status, error
        self._jobs.pop(job.result_id, None)
        job.done.set()

    async def cancel(self, job: Job) -> None:
        if not await self.manager.kill(job.result_id, ContainerStatus.KILLED):
            if job.scope is not None:
                job.scope.cancel()
        with anyio.move_on_after(self.manager.config.kill_grace * 3):
            await job.done.wait()
