"""Structured logs carry the traceback of an exception (issue 14: only `"exc_info": true` was logged)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import structlog
    from gvisor_mcp import logs

    logs.configure("INFO")
    log = structlog.get_logger("t")

    def deep():
        raise ValueError("the cause")

    try:
        deep()
    except ValueError:
        log.exception("job_crashed", result_id="res_1")
    log.info("after", n=1)
    """
)


@pytest.mark.slow
def test_an_exception_is_logged_with_its_traceback_as_one_json_line() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stderr  # stdout is the MCP channel
    crashed, after = [json.loads(line) for line in r.stderr.splitlines()]
    assert crashed["event"] == "job_crashed" and crashed["level"] == "error"
    assert crashed["result_id"] == "res_1" and "exc_info" not in crashed
    tb = crashed["exception"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "in deep\n" in tb and tb.rstrip().endswith("ValueError: the cause")
    assert after["event"] == "after" and "exception" not in after
