"""Without runsc (or root), the suite fails instead of passing with the sandbox tests skipped.

Runs pytest in a subprocess whose PATH has no runsc: selecting a runsc test is
an error with a clear message; GVISOR_MCP_TESTS_WITHOUT_RUNSC=1 skips them on
purpose; unit tests alone need neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess

REPO = Path(__file__).resolve().parents[2]


def pytest_without_runsc(*args: str, opt_out: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GVISOR_MCP_TESTS_WITHOUT_RUNSC"}
    env["PATH"] = "/nonexistent"  # no runsc to be found
    if opt_out:
        env["GVISOR_MCP_TESTS_WITHOUT_RUNSC"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_selecting_runsc_tests_without_runsc_fails_clearly() -> None:
    r = pytest_without_runsc("tests/integration/test_manager.py", "-k", "test_echo")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    reason = "runsc not installed" if os.geteuid() == 0 else "needs root"
    assert f"need runsc and root, and here: {reason}" in out, out
    assert "GVISOR_MCP_TESTS_WITHOUT_RUNSC=1" in out


def test_the_opt_out_skips_them_explicitly() -> None:
    r = pytest_without_runsc("tests/integration/test_manager.py", "-k", "test_echo", opt_out=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout, r.stdout


def test_deselecting_them_needs_neither_the_opt_out_nor_runsc() -> None:
    r = pytest_without_runsc(
        "tests/integration/test_manager.py", "tests/fast/test_tokens.py", "-m", "not runsc", "-k", "test_echo or reload"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout and "deselected" in r.stdout and "skipped" not in r.stdout, r.stdout


def test_unit_tests_alone_need_neither() -> None:
    r = pytest_without_runsc("tests/unit/test_text.py", "-k", "known_sequences")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped" not in r.stdout
