"""What the tools show: structured results and the text a model reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..results import StoredResult
from ..results.record import RunRecord
from ..sandbox import ContainerStatus
from ..text import render
from .context import TenantState
from .models import ExecResult
from .render import excerpt


@dataclass(frozen=True)
class SchemaFacts:
    """What a caller's policy allows, as the tool schemas publish it."""

    networks: tuple[str, ...]
    images: tuple[str, ...]
    default_workdir: str
    default_timeout: float
    default_memory_mb: int
    max_timeout: float | None
    max_cpus: float | None
    max_memory_mb: int | None
    max_pids: int | None
    head_bytes: int
    tail_bytes: int
    foreground_limit: float
    workspace: str | None
    egress_text: str = "nothing"
    egress: bool = False
    """True when a run may reach beyond this machine (network host, or sandbox with an
    allowlist): execute_command's openWorldHint."""

    @property
    def limits_text(self) -> str:
        parts = [
            f"timeout {self.default_timeout:g} s / {_fmt(self.max_timeout, ' s')}",
            f"memory {self.default_memory_mb} MiB / {_fmt(self.max_memory_mb, ' MiB')}",
            f"cpus max {_fmt(self.max_cpus, '')}",
            f"processes max {_fmt(self.max_pids, '')}",
        ]
        return "; ".join(parts)


def schema_facts(settings: Any) -> SchemaFacts:
    """The facts a tenant's effective policy settings publish in the schemas."""
    return SchemaFacts(
        networks=tuple(settings.network.allowed),
        images=tuple(settings.images.allowed),
        default_workdir=settings.default_workdir,
        default_timeout=settings.defaults.timeout,
        default_memory_mb=settings.defaults.memory,
        max_timeout=settings.ceilings.timeout,
        max_cpus=settings.ceilings.cpus,
        max_memory_mb=settings.ceilings.memory,
        max_pids=settings.ceilings.max_pids,
        head_bytes=settings.output.head,
        tail_bytes=settings.output.tail,
        foreground_limit=settings.foreground_limit,
        workspace=settings.workspace.mount if settings.workspace.enabled else None,
        egress_text=settings.network.egress.rules().describe(),
        egress="host" in settings.network.allowed
        or ("sandbox" in settings.network.allowed and bool(settings.network.egress.allow)),
    )


NETWORK_LINES = 8
"""Destinations named in the text (denied ones first); all are in `network`."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def network_lines(net: Any) -> list[str]:
    """`network: denied evil.example:443 (not in the egress allowlist)` and friends."""
    order = {"denied": 0, "failed": 1, "allowed": 2}
    rows = sorted(net.destinations, key=lambda d: order.get(d.verdict, 3))
    lines = []
    for d in rows[:NETWORK_LINES]:
        # The destination is what the sandbox asked for: rendered like its output.
        detail = render(d.reason or "")
        if d.verdict != "denied":
            traffic = (
                f"{d.connections} connection{'s' if d.connections != 1 else ''}, "
                f"{_size(d.bytes_up)} up, {_size(d.bytes_down)} down"
            )
            detail = f"{detail}; {traffic}" if detail else traffic
        lines.append(f"network: {d.verdict} {render(d.destination)}" + (f" ({detail})" if detail else ""))
    more = len(rows) - NETWORK_LINES + (1 if net.other_connections else 0)
    if more > 0:
        lines.append(
            f"network: ... and more destinations ({net.connections} connections in all); see the result's network section"
        )
    if not rows:
        lines.append("network: no connection through the egress proxy")
    return lines


def _fmt(v: float | None, unit: str) -> str:
    return "no maximum" if v is None else f"{v:g}{unit}"


SHOWN_RULES = ("requested", "clamped to ceiling")
"""Receipt entries a result shows by default: what the call asked for. Defaults and
policy-set fields are the same for every call of a tenant; they are in the full
receipt (inspect_result(receipt=true))."""


def compact_receipt(limits: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a limits receipt worth sending with every result: the policy's
    hash, the image's digest when a store image ran (with the policy hash: what ran,
    under what), the entries the call requested (granted as asked or clamped), the notes."""
    if not limits:
        return limits
    out: dict[str, Any] = {"policy_sha256": limits.get("policy_sha256")}
    if limits.get("image_digest"):
        out["image_digest"] = limits["image_digest"]
    entries = [e for e in limits.get("entries", ()) if e.get("rule") in SHOWN_RULES]
    if entries:
        out["entries"] = entries
    if limits.get("notes"):
        out["notes"] = list(limits["notes"])
    return out


def receipt_lines(limits: dict[str, Any] | None) -> list[str]:
    """The full receipt as text, one field a line (inspect_result receipt=true)."""
    if not limits:
        return ["limits: no receipt (the call never ran)"]
    lines = [
        f"limits: tenant {limits.get('tenant')}, policy {limits.get('policy_source')} "
        f"sha256 {limits.get('policy_sha256')}"
    ]
    for e in limits.get("entries", ()):
        asked = "" if e.get("requested") is None else f", requested {e['requested']}"
        ceiling = "" if e.get("limit") is None else f", ceiling {e['limit']}"
        lines.append(f"limits: {e.get('field')}={e.get('granted')} ({e.get('rule')}{asked}{ceiling})")
    if limits.get("image_digest"):
        lines.append(f"limits: image digest {limits['image_digest']}")
    return [render(line) for line in lines]


def exec_result(
    app: TenantState, stored: StoredResult | None, head: int, tail: int, *, full_receipt: bool = False
) -> ExecResult:
    """The structured result; stdout/stderr are the same excerpts the text shows.
    `limits` is the compact receipt unless `full_receipt`."""
    if stored is None:  # evicted in the instant since it finished: say so
        raise LookupError("result no longer stored")
    texts: dict[str, str] = {}
    cut: dict[str, bool] = {}
    for stream in ("stdout", "stderr"):
        first, stored_len = app.store.read(stored, stream, 0, head + tail)
        last = b""
        if stored_len > head + tail:
            first = first[:head]
            last, _ = app.store.read(stored, stream, stored_len - tail, tail)
        written = getattr(stored, f"{stream}_bytes") if stored.status != ContainerStatus.RUNNING else stored_len
        texts[stream] = excerpt(first, last, stored_len, result_id=stored.result_id, stream=stream, written=written)
        cut[stream] = stored_len > head + tail or written > stored_len
    running = stored.status == ContainerStatus.RUNNING
    return ExecResult.model_validate(
        {
            **stored.model_dump(include=set(RunRecord.model_fields)),
            "stdout": texts["stdout"],
            "stderr": texts["stderr"],
            "stdout_truncated": cut["stdout"],
            "stderr_truncated": cut["stderr"],
            # While it runs, the totals are not known yet (the excerpt counts what is stored).
            "stdout_bytes": 0 if running else stored.stdout_bytes,
            "stderr_bytes": 0 if running else stored.stderr_bytes,
            "limits": stored.limits if full_receipt else compact_receipt(stored.limits),
        }
    )


def status_line(r: Any, result_id: str) -> str:
    """`status=exited exit_code=0 duration=...ms ... result_id=...`: how the run ended (so far)."""
    head = [f"status={r.status}"]
    if r.exit_code is not None:
        head.append(f"exit_code={r.exit_code}")
    if r.signal:
        head.append(f"signal={r.signal}")
    if r.duration_ms is not None:
        head.append(f"duration={r.duration_ms}ms")
    if getattr(r, "boot_ms", None) is not None:
        head.append(f"boot={r.boot_ms}ms" + (" (warm)" if r.warm else ""))
    if r.peak_memory_bytes:
        head.append(f"peak_memory={r.peak_memory_bytes // (1024 * 1024)}MiB")
    if r.oom_killed:
        head.append("OOM: the memory limit was hit")
    head.append(f"result_id={result_id}")
    lines = [" ".join(head)]
    if r.status == ContainerStatus.RUNNING:
        lines.append(
            f'Still running. Wait for it with inspect_result(result_id="{result_id}", wait_seconds=30); '
            f'stop it with cancel_command(result_id="{result_id}").'
        )
    if r.status == ContainerStatus.TIMED_OUT:
        lines.append("The command hit its time limit and was killed.")
    if r.error:
        lines.append(f"error: {render(r.error)}")
    return "\n".join(lines)


def render_text(r: ExecResult, result_id: str) -> str:
    """The text content: the status, notes, network lines, then each non-empty stream."""
    lines = [status_line(r, result_id)]
    if r.limits and r.limits.get("notes"):
        lines.extend(render(f"limits: {n}") for n in r.limits["notes"])
    if r.network is not None:
        lines.extend(network_lines(r.network))
    for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        if text:
            lines.append(f"--- {name} ---\n{text}")
    if not r.stdout and not r.stderr and r.status != ContainerStatus.RUNNING:
        lines.append("(no output)")
    return "\n".join(lines)
