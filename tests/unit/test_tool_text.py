"""The pieces of tool text built in tools/: each is rendered where it is made
(text.render, the one renderer), and the paging marker is a call that works.

Pure functions over crafted values: a hostile egress destination cannot be
produced through the real proxy (it refuses malformed hosts), so the report
is built here.
"""

from __future__ import annotations

import re
from pathlib import Path

from gvisor_mcp.text import is_safe
from gvisor_mcp.tools.models import ExecResult, NetworkReport
from gvisor_mcp.tools.render import MAX_PAGE, excerpt, marker
from gvisor_mcp.tools.view import compact_receipt, network_lines, receipt_lines, render_text

HOSTILE = "evil\x1b]0;TITLE\x07\u202e\u200b.example:443"


def report(destination: str, reason: str | None) -> NetworkReport:
    return NetworkReport.model_validate(
        {
            "proxy": "10.0.0.1:3128",
            "connections": 2,
            "denied": 1,
            "bytes_up": 10,
            "bytes_down": 20,
            "destinations": [
                {
                    "destination": destination,
                    "verdict": "denied",
                    "reason": reason,
                    "connections": 1,
                    "bytes_up": 0,
                    "bytes_down": 0,
                },
                {
                    "destination": destination,
                    "verdict": "allowed",
                    "reason": reason,
                    "connections": 1,
                    "bytes_up": 10,
                    "bytes_down": 20,
                },
            ],
        }
    )


def test_network_lines_render_what_the_sandbox_asked_for() -> None:
    lines = network_lines(report(HOSTILE, "because\x1b[2J"))
    assert len(lines) == 2
    for line in lines:
        assert is_safe(line), repr(line)
        assert "evil\\x1b]0;TITLE\\x07\\u202e\\u200b.example:443" in line
    assert lines[0].endswith("(because\\x1b[2J)")


def test_result_text_renders_error_notes_and_network() -> None:
    r = ExecResult(
        result_id="res_1",
        status="error",
        error="boom\x1b[31m\u2066",
        limits={"policy_sha256": "0" * 64, "notes": ["clamped\x07"]},
        network=report(HOSTILE, None),
    )
    t = render_text(r, "res_1")
    assert is_safe(t), repr(t)
    assert "error: boom\\x1b[31m\\u2066" in t and "limits: clamped\\x07" in t


def test_the_marker_call_is_within_the_page_maximum() -> None:
    big = marker("res_a", "stdout", 4096, 1_980_703)
    call = re.search(r"inspect_result\(([^)]*)\)", big).group(1)
    assert call == f'result_id="res_a", stream="stdout", offset=4096, length={MAX_PAGE}'
    assert "offset=next_offset" in big and "until next_offset reaches 1984799" in big
    small = marker("res_a", "stderr", 10, 500)
    assert "offset=10, length=500)" in small and "next_offset" not in small
    exact = marker("res_a", "stdout", 0, MAX_PAGE)
    assert f"length={MAX_PAGE})" in exact and "next_offset" not in exact


def test_excerpt_renders_head_and_tail() -> None:
    text = excerpt(b"\x1b[2Jhead", b"tail\xff", 10_000, result_id="res_a", stream="stdout", written=10_000)
    assert is_safe(text) and text.startswith("\\x1b[2Jhead\n[... 9987 bytes") and text.endswith("tail\\xff")


def test_compact_receipt_keeps_what_was_asked_and_the_hash() -> None:
    full = {
        "tenant": "t",
        "policy_sha256": "a" * 64,
        "policy_source": "p.yaml",
        "image_digest": None,
        "entries": [
            {"field": "memory_mb", "requested": 128, "granted": 128, "rule": "requested", "limit": 4096},
            {"field": "cpus", "requested": 64, "granted": 4, "rule": "clamped to ceiling", "limit": 4},
            {"field": "timeout_seconds", "requested": None, "granted": 30, "rule": "default", "limit": 600},
            {"field": "user", "requested": None, "granted": "1000:1000", "rule": "policy", "limit": None},
        ],
        "notes": ["cpus: asked 64, given the ceiling 4"],
    }
    small = compact_receipt(full)
    assert small == {"policy_sha256": "a" * 64, "entries": full["entries"][:2], "notes": full["notes"]}
    assert compact_receipt({**full, "entries": full["entries"][2:], "notes": []}) == {"policy_sha256": "a" * 64}
    assert compact_receipt(None) is None
    lines = receipt_lines({**full, "tenant": "t\x1b"})
    assert all(is_safe(x) for x in lines) and lines[0].startswith("limits: tenant t\\x1b, policy p.yaml")
    assert "limits: cpus=4 (clamped to ceiling, requested 64, ceiling 4)" in lines


def test_tools_use_the_one_renderer() -> None:
    """No second renderer in tools/: bytes become text through text.render_bytes/render only."""
    tools = Path(__file__).resolve().parents[2] / "src" / "gvisor_mcp" / "tools"
    for p in tools.rglob("*.py"):
        source = p.read_text()
        assert "safe_text" not in source, p.name
        assert "backslashreplace" not in source, p.name  # text.render_bytes's job
