"""Commands in flight, independent of the request that started them.

A tool call starts a Job and waits for it up to the policy's foreground limit;
past that (or with background=true) the call returns `running` and the job
goes on in the server's task group, reachable by inspect_result,
list_active and cancel_command. Every job ends in the result store, whatever
happens to the request, the client or the Manager.

Why over ~400 lines: admission (FairGate, CallRate), a job's life and its
recording are one contract: every job ends in the store, whatever happens.
Splitting would scatter the paths that guarantee it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from .audit import AuditLog
from .errors import InfrastructureError, Refusal
from .metrics import Metrics
from .network import ConnectionEvent, EgressGrant, EgressRules
from .results import ResultStore, StoreUnavailable
from .results.record import RunOutcome
from .runner import HostLost, JobRunner, RunRefused, as_runner
from .sandbox import (
    ContainerOptions,
    ContainerResult,
    ContainerStatus,
    InvalidOptionsError,
    ManagerAPI,
    ManagerClosedError,
    RunscError,
    SandboxError,
)
from .text import clip_command, command_sha256

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
    status: ContainerStatus = ContainerStatus.RUNNING
    error: str | None = None
    out_bytes: int = 0
    err_bytes: int = 0
    last_line: bytes = b""
    scope: anyio.CancelScope | None = None
    """Made by Jobs.start, before the job's task runs: a cancel that comes
    before the task begins is kept by the scope and stops the job on entry."""
    container_id: str | None = None
    """Known once a sandbox is assigned (a warm one may be claimed)."""
    holding: Any = None
    """What the run holds until it ends (its store image's lease), released in _finish."""
    command_bytes: int = 0
    command_sha256: str = ""
    """Of the whole command (`command` is cut to 4 KiB: text.clip_command)."""
    store_error: str | None = None
    """Set when the store could not record the final result (disk full)."""
    store_outcome: tuple[ContainerStatus, RunOutcome] | None = None
    """What to store once the disk takes it again (with store_error)."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started_mono

    def skipped(self, n: int, stream: str) -> None:
        if stream == "stdout":
            self.out_bytes += n
        else:
            self.err_bytes += n

    def seen(self, chunk: bytes, stream: str) -> None:
        if stream == "stdout":
            self.out_bytes += len(chunk)
        else:
            self.err_bytes += len(chunk)
        lines = chunk.rstrip(b"\n").rsplit(b"\n", 1)
        if lines[-1]:
            self.last_line = lines[-1][-200:]


class FairGate:
    """Sandbox slots shared by tenants.

    A freed slot goes to the waiting tenant that holds the fewest (ties: the
    one that waited longest). The Manager's own limiter is first-come-first-
    served: one tenant queueing many runs would make every other tenant wait
    behind all of them.

    With `reserve` (the server sets 1 when it serves several tenants), the
    last `reserve` free slots go only to a tenant holding less than its fair
    share: capacity / the number of tenants holding or waiting (at least 2,
    so a tenant alone still leaves room for a second one). One tenant with
    long commands and a quota as large as the server then holds at most
    capacity - reserve slots, and another tenant's short call never waits
    for those long commands to end, only for a slot being freed. The price:
    a tenant alone on the server uses capacity - reserve slots, not all.
    """

    def __init__(self, capacity: int, *, reserve: int = 0) -> None:
        self.capacity = capacity
        self.reserve = reserve if capacity > reserve else 0
        self.used = 0
        self.held: dict[str, int] = {}
        self._queues: dict[str, deque[anyio.Event]] = {}

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def fair_share(self) -> float:
        tenants = len(self.held.keys() | self._queues.keys())
        return self.capacity / max(2 if self.reserve else 1, tenants)

    def may_take(self, tenant: str) -> bool:
        free = self.capacity - self.used
        if free <= 0:
            return False
        return free > self.reserve or self.held.get(tenant, 0) < self.fair_share()

    def _take(self, tenant: str) -> None:
        self.used += 1
        self.held[tenant] = self.held.get(tenant, 0) + 1

    def _dispatch(self) -> None:
        """Hand free slots to the waiters allowed to take them, fewest held first."""
        while self._queues:
            ready = [t for t in self._queues if self.may_take(t)]
            if not ready:
                return
            # dicts keep insertion order: min() picks the longest-waiting among equals
            nxt = min(ready, key=lambda t: self.held.get(t, 0))
            q = self._queues.pop(nxt)
            ev = q.popleft()
            if q:
                self._queues[nxt] = q  # to the back among equals
            self._take(nxt)
            ev.set()

    async def acquire(self, tenant: str) -> None:
        if not self._queues and self.may_take(tenant):
            self._take(tenant)
            return
        ev = anyio.Event()
        self._queues.setdefault(tenant, deque()).append(ev)
        self._dispatch()  # a newcomer below its fair share may take the reserve at once
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
                self._dispatch()  # fewer tenants waiting: the fair share may have grown
            raise

    def release(self, tenant: str) -> None:
        self.used -= 1
        self.held[tenant] -= 1
        if not self.held[tenant]:
            del self.held[tenant]
        self._dispatch()


class QuotaExceeded(Refusal):
    """A tenant is at its concurrency quota; the message names it."""

    kind = "quota"
    decision = "quota"


class RateLimited(QuotaExceeded):
    """A tenant is at its `runs_per_minute`."""

    kind = "rate"
    throttled = True


class ResultNotStored(InfrastructureError):
    """The command ran, but the store could not record its result (a full
    disk); the text says what is known and that the output is lost."""

    def for_agent(self) -> str:
        return str(self)


class CallRate:
    """execute_command calls per tenant over the last 60 s (a sliding window).

    Every call counts, the ones the policy refuses too: a refusal costs an
    audit line and some work, so a tenant sending refused calls in a loop is
    held to its `runs_per_minute` like one that runs them. Calls refused by
    this limit itself do not count (the window would never empty).
    """

    WINDOW = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    def count(self, tenant: str, per_minute: int | None) -> None:
        """Count one call, or raise QuotaExceeded when the tenant is at its rate."""
        if per_minute is None:
            return
        now = self._clock()
        recent = self._recent[tenant]
        while recent and now - recent[0] >= self.WINDOW:
            recent.popleft()
        if len(recent) >= per_minute:
            retry = self.WINDOW - (now - recent[0])
            raise RateLimited(
                f"quota: tenant {tenant!r} made {per_minute} execute_command calls in the last minute, "
                f"refused ones included (runs_per_minute={per_minute}); retry in {max(1, math.ceil(retry))} s"
            )
        recent.append(now)


class Jobs:
    def __init__(
        self,
        manager: ManagerAPI | JobRunner,
        store: ResultStore,
        audit: AuditLog,
        task_group: anyio.abc.TaskGroup,
        metrics: Metrics | None = None,
        *,
        shared: bool = False,
    ) -> None:
        """`shared`: the server serves several tenants (HTTP): admission then
        keeps a slot for a tenant below its fair share (FairGate reserve)."""
        self.runner: JobRunner = as_runner(manager)
        """Where jobs run: this host's Manager, or a cluster (runner.py)."""
        self.metrics = metrics
        self.gate = FairGate(self.runner.config.max_concurrent_containers, reserve=1 if shared else 0)
        self.store = store
        self.audit = audit
        self.rate = CallRate()
        self._tg = task_group
        self._jobs: dict[str, Job] = {}
        self._unstored: dict[str, Job] = {}
        """Finished jobs whose final row the store refused (disk full): retried
        before each new start and finish, and reported by unstored()."""

    def container_of(self, job: Job) -> str | None:
        run = self.runner.active_run(job.result_id)
        return run.container_id if run is not None else job.container_id

    def active_all(self) -> list[Job]:
        return list(self._jobs.values())

    def active(self, tenant: str) -> list[Job]:
        return [j for j in self._jobs.values() if j.tenant == tenant]

    def get(self, result_id: str, tenant: str) -> Job | None:
        job = self._jobs.get(result_id)
        return job if job is not None and job.tenant == tenant else None

    def unstored(self, result_id: str, tenant: str) -> Job | None:
        """A finished job of `tenant` whose result the store could not record yet."""
        job = self._unstored.get(result_id)
        return job if job is not None and job.tenant == tenant else None

    def admit(self, tenant: str, max_concurrent: int | None) -> None:
        """Raise QuotaExceeded when the tenant may not start another run now."""
        if max_concurrent is not None and len(self.active(tenant)) >= max_concurrent:
            raise QuotaExceeded(
                f"quota: tenant {tenant!r} already has {max_concurrent} command(s) running "
                f"(max_concurrent={max_concurrent}); wait for one to finish (inspect_result with "
                "wait_seconds) or cancel one (cancel_command), then retry"
            )

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
        before anything is recorded) and what it returns is released when the job ends.
        Raises StoreUnavailable (nothing started, the hold released) when the
        result store cannot record the run."""
        self._retry_unstored()
        rid = self.store.new_id()
        holding = hold(rid) if hold is not None else None
        cap = options.resources.merged_over(self.runner.config.default_resources).max_output_bytes
        job = Job(
            result_id=rid,
            tenant=tenant,
            session=session,
            command=clip_command(command),
            command_bytes=len(command.encode("utf-8", "surrogatepass")),
            command_sha256=command_sha256(command),
            limits=limits,
            timeout=options.resources.timeout or self.runner.config.default_resources.timeout,
            holding=holding,
        )
        try:
            self.store.start(rid, tenant=tenant, session=session, command=command, container_id=None, limits=limits)
            try:
                out_w = self.store.part_writer(rid, "stdout", cap)
                err_w = self.store.part_writer(rid, "stderr", cap)
            except OSError as e:
                with contextlib.suppress(StoreUnavailable):
                    self.store.finish(
                        rid, status=ContainerStatus.ERROR, fields=RunOutcome(error=f"not started: {e.strerror or e}")
                    )
                raise StoreUnavailable(e.strerror or str(e)) from e
        except StoreUnavailable:
            if holding is not None:
                holding.release()
            raise

        def on_out(chunk: bytes) -> None:
            job.seen(chunk, "stdout")
            out_w(chunk)

        def on_err(chunk: bytes) -> None:
            job.seen(chunk, "stderr")
            err_w(chunk)

        # Bytes the capture drops may come as a count only (a cold run's
        # output file, sandbox/outfile.py): the part file is full by then.
        on_out.skipped = lambda n: job.skipped(n, "stdout")  # type: ignore[attr-defined]
        on_err.skipped = lambda n: job.skipped(n, "stderr")  # type: ignore[attr-defined]
        update: dict[str, Any] = {"stdout_writer": on_out, "stderr_writer": on_err}
        if isinstance(options.egress, EgressRules):
            # Every connection attempt of this run goes to the audit log and
            # the metrics, with the tenant and result id the proxy never sees.
            update["egress"] = EgressGrant(options.egress, on_event=lambda ev: self._egress_event(job, ev, policy_hash))
        opts = options.model_copy(update=update)
        job.scope = anyio.CancelScope()
        self._jobs[rid] = job
        self._tg.start_soon(self._run, job, opts, (out_w, err_w), policy_hash)
        return job

    async def _run(self, job: Job, options: ContainerOptions, writers: tuple, policy_hash: str | None) -> None:
        result: ContainerResult | None = None
        error: str | None = None
        status = ContainerStatus.ERROR
        try:
            if job.scope is None:
                job.scope = anyio.CancelScope()
            with job.scope:
                # cancel_command may have come before this task began: stop here,
                # before a slot (gate.acquire does not wait when one is free)
                await anyio.lowlevel.checkpoint_if_cancelled()
                await self.gate.acquire(job.tenant)
                try:
                    result = await self.runner.run_job(
                        options, run_id=job.result_id, tenant=job.tenant, session=job.session
                    )
                finally:
                    self.gate.release(job.tenant)
            if result is not None:
                status, error = result.status, result.error
                if result.status == ContainerStatus.KILLED and error is None and self.runner.closed:
                    error = "the server shut down while the command ran"
            else:  # cancel_command while it waited for a free slot
                status, error = ContainerStatus.KILLED, "cancelled before a sandbox was free to run it"
        except ManagerClosedError:
            status, error = ContainerStatus.KILLED, "the server shut down before the command could start"
        except RunRefused as e:
            error = str(e)
        except HostLost as e:
            status, error = HostLost.status, str(e)
        except InvalidOptionsError as e:
            error = str(e)
        except (SandboxError, RunscError) as e:
            error = f"sandbox failure: {e}"
        except anyio.get_cancelled_exc_class():
            status, error = ContainerStatus.KILLED, "the server shut down while the command ran"
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

    def _finish(
        self,
        job: Job,
        result: ContainerResult | None,
        status: ContainerStatus,
        error: str | None,
        writers: tuple[Any, ...],
        policy_hash: str | None,
    ) -> None:
        """Record the outcome (store, audit, metrics) and wake the waiters.

        Never raises: it runs in the job's task, inside the server's task
        group, where an exception would end the whole server (issue 14: a
        full disk under audit.write did exactly that).
        """
        try:
            self._record(job, result, status, error, writers, policy_hash)
        except Exception:
            log.exception("job_finish_failed", result_id=job.result_id)
        finally:
            job.result, job.status, job.error = result, status, error
            self._jobs.pop(job.result_id, None)
            job.done.set()

    def _record(
        self,
        job: Job,
        result: ContainerResult | None,
        status: ContainerStatus,
        error: str | None,
        writers: tuple[Any, ...],
        policy_hash: str | None,
    ) -> None:
        for w in writers:
            with contextlib.suppress(OSError):
                w.close()
        if job.holding is not None:
            job.holding.release()
        if result is not None:
            job.container_id = result.container_id
            outcome = RunOutcome.of(result, error=error)
        else:
            outcome = RunOutcome(error=error, duration_ms=round(job.elapsed() * 1000))
        self._retry_unstored()
        self._store_final(job, result, status, outcome)
        self.audit.write(
            tenant=job.tenant,
            session=job.session,
            result_id=job.result_id,
            container_id=job.container_id,
            command=job.command,
            # of the whole command (job.command is cut); known when start() made the job
            **(
                {"command_bytes": job.command_bytes, "command_sha256": job.command_sha256} if job.command_sha256 else {}
            ),
            policy_hash=policy_hash,
            decision="allowed",
            status=status,
            exit_code=result.exit_code if result else None,
            duration_ms=outcome.duration_ms,
            boot_ms=outcome.boot_ms,
            error=error,
        )
        if self.metrics is not None:
            self.metrics.finished(
                job.tenant,
                status,
                warm=result.warm if result else None,
                boot=result.boot_duration if result else None,
                duration=result.duration if result else None,
            )

    def _store_final(
        self, job: Job, result: ContainerResult | None, status: ContainerStatus, outcome: RunOutcome
    ) -> None:
        """Store the outcome; on a full disk, keep what can be kept and say so.

        First the whole result; failing that, the row without the output
        (its `error` says the output was lost); failing that too, the job is
        kept in memory (`unstored`) and retried before the next start or
        finish, and the caller's answer says the result could not be stored.
        Nothing raises: a job task must never take the server down.
        """
        try:
            self.store.finish(
                job.result_id,
                status=status,
                stdout=result.stdout if result else b"",
                stderr=result.stderr if result else b"",
                fields=outcome,
            )
        except StoreUnavailable as e:
            log.error("result_output_not_stored", result_id=job.result_id, error=str(e))
            lost = f"the server could not store this command's output ({e}); it is lost"
            error = outcome.error
            outcome = outcome.model_copy(update={"error": f"{error}; {lost}" if error else lost})
            try:
                self.store.finish(job.result_id, status=status, fields=outcome)
            except StoreUnavailable as e2:
                log.error("result_not_stored", result_id=job.result_id, error=str(e2))
                job.store_error = (
                    f"the command ended (status {status}"
                    + (f", exit code {result.exit_code}" if result is not None else "")
                    + f") but the server could not store its result: {e2}. The server's state "
                    "disk is probably full; its output is lost. Retry once the operator has freed space."
                )
                job.store_outcome = (status, outcome)
                self._unstored[job.result_id] = job
        except Exception:  # a bug: the row stays 'running' until recover() at the next start
            log.exception("store_finish_failed", result_id=job.result_id)
        try:
            self.store.evict(job.tenant)
        except Exception:
            log.exception("evict_failed", tenant=job.tenant)

    def _retry_unstored(self) -> None:
        for rid, job in list(self._unstored.items()):
            status, outcome = job.store_outcome or (ContainerStatus.ERROR, RunOutcome())
            try:
                self.store.finish(rid, status=status, fields=outcome)
            except StoreUnavailable:
                return  # still full: try again later
            except Exception:
                log.exception("store_finish_failed", result_id=rid)
            del self._unstored[rid]

    async def cancel(self, job: Job) -> None:
        if not await self.runner.kill_job(job.result_id) and job.scope is not None:
            job.scope.cancel()
        with anyio.move_on_after(self.runner.config.kill_grace * 3):
            await job.done.wait()
