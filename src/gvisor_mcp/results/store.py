"""Durable results: SQLite for the record, one file per captured stream.

Why sync sqlite3 inside async code: every statement here touches one row on
local disk and takes well under a millisecond; a thread hop would cost more
than it saves, and DESIGN.md asks for no threads unless a library forces them.

Scoping: every read takes the caller's tenant, and a result of another tenant
is reported exactly like an id that never existed.

Streams: while a command runs, its output is appended to `<id>.<stream>.part`
up to the capture cap (so `inspect_result` can page it live); when it ends,
the Manager's head+tail capture is written to `<id>.<stream>` and the part
file removed. Paging the final file reconstructs the captured stream byte for
byte; when truncated, the gap sits at byte `cap // 2`.

Why over ~400 lines: the schema, the stream files and the disk accounting
are one durability contract (a row and its files are written, counted and
evicted together).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from ..errors import StateUnavailable
from ..sandbox import ContainerStatus
from ..sandbox.ownership import OwnerLock
from ..text import clip_command
from .record import RunOutcome, RunRecord

log = structlog.get_logger("gvisor_mcp.results")

# \Z, not $: "$" also matches before a trailing newline.
RESULT_ID_RE = re.compile(r"^res_[0-9a-f]{32}\Z")
STREAMS = ("stdout", "stderr")
ROW_OVERHEAD_BYTES = 512
"""What a result costs on disk besides its text columns and stream files
(fixed columns, two index entries, SQLite page slack), counted by evict()."""

_COST = (
    "(stored_bytes + ? + length(CAST(command AS BLOB)) + ifnull(length(CAST(limits AS BLOB)), 0) "
    "+ ifnull(length(CAST(error AS BLOB)), 0) + ifnull(length(CAST(session AS BLOB)), 0))"
)
"""SQL: the bytes one row costs (the ? is ROW_OVERHEAD_BYTES)."""


class StoreUnavailable(StateUnavailable):
    """The result store could not write (e.g. the state disk is full)."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    session TEXT,
    owner TEXT NOT NULL,
    container_id TEXT,
    command TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    duration_ms INTEGER,
    boot_ms INTEGER,
    oom_killed INTEGER,
    peak_memory_bytes INTEGER,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    warm INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    limits TEXT,
    error TEXT,
    network TEXT
);
CREATE INDEX IF NOT EXISTS results_tenant_created ON results (tenant, created_at);
CREATE INDEX IF NOT EXISTS results_status ON results (status);
"""


class StoredResult(RunRecord):
    """One row, as tools render it: the run record plus the row's bookkeeping."""

    tenant: str
    session: str | None
    command: str
    created_at: float
    finished_at: float | None


OUTCOME_COLUMNS = tuple(RunOutcome.model_fields)
"""The columns finish() writes: one per RunOutcome field."""


class PartWriter:
    """Appends a run's chunks to its live part file, up to `cap` bytes; `close()` when the run ends.

    The part file only serves live paging: when the disk refuses a write,
    the writer stops (logged once) and the run goes on; its final output
    comes from the Manager's own capture, written by finish().
    """

    def __init__(self, path: Path, cap: int, result_id: str, stream: str) -> None:
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115  (open until close(), when the run ends)
        self._cap = cap
        self._written = 0
        self._result_id = result_id
        self._stream = stream

    def __call__(self, chunk: bytes) -> None:
        if self._file.closed or self._written >= self._cap:
            return
        piece = chunk[: self._cap - self._written]
        try:
            self._file.write(piece)
        except OSError as e:
            log.warning("live_output_not_stored", result_id=self._result_id, stream=self._stream, error=str(e))
            self._written = self._cap  # stop trying; the final capture still comes
            return
        self._written += len(piece)

    def close(self) -> None:
        self._file.close()


class ResultStore:
    """Results of one state directory, shared safely by several servers.

    Bounds, enforced per tenant by `evict()` (after each finished run) and for
    every tenant by `recover()` (at server start):

    - `max_bytes_per_tenant` (default 1 GiB): every byte a tenant's results
      take: stream files, and each row's command text, limits, error and a
      fixed `ROW_OVERHEAD_BYTES`; past it the oldest finished results go
      first. (Command text is stored cut to 4 KiB: text.clip_command.)
    - `max_age_seconds` (default 7 days): finished results created longer ago
      than this go.

    Running results are never evicted. `clock` (default `time.time`) is the
    wall clock used for timestamps and ages; tests pass their own.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_bytes_per_tenant: int = 1 << 30,
        max_age_seconds: float = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = state_dir
        self._clock = clock
        self.out_dir = state_dir / "output"
        self.out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self.max_age_seconds = max_age_seconds
        self._owner = OwnerLock(state_dir / "owners")
        self._db = sqlite3.connect(state_dir / "results.db", timeout=10, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added after a state directory was created (additive only)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(results)")}
        if "warm" not in have:
            self._db.execute("ALTER TABLE results ADD COLUMN warm INTEGER NOT NULL DEFAULT 0")
        if "network" not in have:
            self._db.execute("ALTER TABLE results ADD COLUMN network TEXT")

    @property
    def instance(self) -> str:
        return self._owner.instance

    # --- lifecycle -------------------------------------------------------------

    def recover(self) -> int:
        """Mark runs of dead servers as error; returns how many.

        A server that crashed cannot finish its rows; they would otherwise say
        "running" forever. Rows of live neighbours are left alone. What the
        command wrote before the crash (its part files) becomes its stored
        output, and counts toward the tenant's byte budget. Then every
        tenant's results are evicted past the bounds, so that age applies
        also to tenants that run nothing more.
        """
        rows = self._db.execute("SELECT result_id, owner FROM results WHERE status = 'running'").fetchall()
        n = 0
        for row in rows:
            rid = row["result_id"]
            if self._owner.alive(row["owner"]):
                continue
            won = self._db.execute(
                "UPDATE results SET status='error', finished_at=?, "
                "error='the server stopped (crashed or was killed) while this command ran' "
                "WHERE result_id=? AND status='running'",
                (self._clock(), rid),
            ).rowcount
            if not won:  # another server recovering at the same time got it
                continue
            sizes = {}
            for stream in STREAMS:
                final = self._path(rid, stream)
                try:
                    self._path(rid, stream, part=True).replace(final)
                except FileNotFoundError:
                    pass
                try:
                    sizes[stream] = final.stat().st_size
                except FileNotFoundError:
                    sizes[stream] = 0
            self._db.execute(
                "UPDATE results SET stored_bytes=?, stdout_bytes=?, stderr_bytes=? WHERE result_id=?",
                (sum(sizes.values()), sizes["stdout"], sizes["stderr"], rid),
            )
            n += 1
        self._owner.forget_dead()
        for (tenant,) in self._db.execute("SELECT DISTINCT tenant FROM results").fetchall():
            self.evict(tenant)
        return n

    def close(self) -> None:
        self._db.close()
        self._owner.release()

    # --- writes -----------------------------------------------------------------

    def new_id(self) -> str:
        return "res_" + secrets.token_hex(16)

    def start(
        self,
        result_id: str,
        *,
        tenant: str,
        session: str | None,
        command: str,
        container_id: str | None,
        limits: dict[str, Any] | None,
    ) -> None:
        """Record a run that is starting: its row and its (empty) live part files.

        Raises StoreUnavailable, leaving nothing behind, when the disk cannot
        take them; the caller refuses the call and runs nothing.
        """
        try:
            for stream in STREAMS:
                self._path(result_id, stream, part=True).touch(mode=0o600)
            self._db.execute(
                "INSERT INTO results (result_id, tenant, session, owner, container_id, command, "
                "status, created_at, limits) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (
                    result_id,
                    tenant,
                    session,
                    self.instance,
                    container_id,
                    clip_command(command),
                    self._clock(),
                    json.dumps(limits) if limits is not None else None,
                ),
            )
        except (OSError, sqlite3.Error) as e:
            for stream in STREAMS:
                self._path(result_id, stream, part=True).unlink(missing_ok=True)
            raise StoreUnavailable(_why(e)) from e

    def part_writer(self, result_id: str, stream: str, cap: int) -> PartWriter:
        """A chunk writer appending to the live part file, up to `cap` bytes."""
        return PartWriter(self._path(result_id, stream, part=True), cap, result_id, stream)

    def finish(
        self,
        result_id: str,
        *,
        status: ContainerStatus | str,
        stdout: bytes = b"",
        stderr: bytes = b"",
        fields: RunOutcome | dict[str, Any] | None = None,
    ) -> None:
        """Write the final streams and the outcome; idempotent per result.

        `fields`: the run's outcome (a RunOutcome, or a dict of its fields);
        only the fields it sets are written. Raises StoreUnavailable when the
        disk refuses; the streams written so far stay (finish can be called
        again with less, see Jobs._finish).
        """
        outcome = fields if isinstance(fields, RunOutcome) else RunOutcome.model_validate(fields or {})
        try:
            self._finish(result_id, status=ContainerStatus(status), stdout=stdout, stderr=stderr, outcome=outcome)
        except (OSError, sqlite3.Error) as e:
            for stream in STREAMS:
                final = self._path(result_id, stream)
                final.with_suffix(final.suffix + ".tmp").unlink(missing_ok=True)
            raise StoreUnavailable(_why(e)) from e

    def _finish(
        self, result_id: str, *, status: ContainerStatus, stdout: bytes, stderr: bytes, outcome: RunOutcome
    ) -> None:
        stored = 0
        for stream, data in (("stdout", stdout), ("stderr", stderr)):
            final = self._path(result_id, stream)
            tmp = final.with_suffix(final.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(final)
            self._path(result_id, stream, part=True).unlink(missing_ok=True)
            stored += len(data)
        cols = ["status=?", "finished_at=?", "stored_bytes=?"]
        vals: list[Any] = [status.value, self._clock(), stored]
        values = outcome.model_dump(mode="json", include=outcome.model_fields_set)
        for key in OUTCOME_COLUMNS:
            if key not in values:
                continue
            v = values[key]
            if key == "network":
                if v is None:
                    continue
                v = json.dumps(v)
            cols.append(f"{key}=?")
            vals.append(int(v) if isinstance(v, bool) else v)
        vals.append(result_id)
        self._db.execute(f"UPDATE results SET {', '.join(cols)} WHERE result_id=?", vals)

    def evict(self, tenant: str) -> int:
        """Drop the tenant's oldest finished results past the age or byte budget.

        Returns how many. Only `tenant`'s rows are considered: another
        tenant's usage never evicts them.
        """
        now = self._clock()
        # Every byte counts: streams (stored_bytes) and the row's own text.
        # Running rows count too (their text), but are never evicted.
        rows = self._db.execute(
            f"SELECT result_id, status, created_at, {_COST} AS cost "
            "FROM results WHERE tenant=? ORDER BY created_at DESC, rowid DESC",
            (ROW_OVERHEAD_BYTES, tenant),
        ).fetchall()
        total = 0
        doomed = []
        for row in rows:
            total += row["cost"]
            if row["status"] == "running":
                continue
            if total > self.max_bytes_per_tenant or now - row["created_at"] > self.max_age_seconds:
                doomed.append(row["result_id"])
        for rid in doomed:
            self._db.execute("DELETE FROM results WHERE result_id=?", (rid,))
            for stream in STREAMS:
                self._path(rid, stream).unlink(missing_ok=True)
                self._path(rid, stream, part=True).unlink(missing_ok=True)
        return len(doomed)

    # --- reads -------------------------------------------------------------------

    def exists(self, result_id: str) -> bool:
        """Whether any tenant's result has this id (a cluster agent runs an id at most once)."""
        return self._db.execute("SELECT 1 FROM results WHERE result_id=?", (result_id,)).fetchone() is not None

    def get(self, result_id: str, tenant: str) -> StoredResult | None:
        """The result, or None when absent OR another tenant's (indistinguishable)."""
        if not RESULT_ID_RE.match(result_id or ""):
            return None
        row = self._db.execute("SELECT * FROM results WHERE result_id=? AND tenant=?", (result_id, tenant)).fetchone()
        return _row(row) if row else None

    def read(self, result: StoredResult, stream: str, offset: int, length: int) -> tuple[bytes, int]:
        """(bytes at [offset, offset+length), total bytes stored so far)."""
        done = result.status != ContainerStatus.RUNNING
        path = self._path(result.result_id, stream, part=not done)
        if not path.exists():
            # Finished between our read of the row and of the file.
            path = self._path(result.result_id, stream, part=done)
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(min(max(0, offset), total))
                return f.read(max(0, length)), total
        except FileNotFoundError:
            return b"", 0

    def usage(self, tenant: str) -> int:
        """Bytes the tenant's results take, as evict() counts them."""
        row = self._db.execute(
            f"SELECT ifnull(sum({_COST}), 0) FROM results WHERE tenant=?",
            (ROW_OVERHEAD_BYTES, tenant),
        ).fetchone()
        return int(row[0])

    def _path(self, result_id: str, stream: str, part: bool = False) -> Path:
        if stream not in STREAMS or not RESULT_ID_RE.match(result_id):
            raise ValueError(f"bad stream or result id: {stream!r} {result_id!r}")
        return self.out_dir / f"{result_id}.{stream}{'.part' if part else ''}"


def _why(e: BaseException) -> str:
    """An OS or SQLite error as the reason a client can read (no host path)."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e)


def _row(row: sqlite3.Row) -> StoredResult:
    d = dict(row)
    d.pop("owner", None)
    d.pop("stored_bytes", None)
    d["limits"] = json.loads(d["limits"]) if d.get("limits") else None
    d["network"] = json.loads(d["network"]) if d.get("network") else None
    for k in ("oom_killed", "stdout_truncated", "stderr_truncated", "warm"):
        d[k] = bool(d.get(k))
    return StoredResult(**d)
