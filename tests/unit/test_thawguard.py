"""The thaw guard's script (sandbox/thawguard.py) with a real /bin/sh on real
files: it writes only into the files its glob matches, whatever the
directory's name holds, and only once its stdin ends."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from gvisor_mcp.sandbox.thawguard import ThawGuard, guard_script


def tree(base: Path) -> Path:
    parent = base / "odd 'name' $(touch pwned) *"
    for name in ("gm-aaaaaaaa-1", "gm-aaaaaaaa-2", "gm-bbbbbbbb-1", "gm-aaaaaaaa-3"):
        (parent / name).mkdir(parents=True)
        (parent / name / "freezer.state").write_text("FROZEN\n")
    (parent / "gm-aaaaaaaa-3" / "freezer.state").unlink()  # a leaf that went: nothing is created there
    return parent


def states(parent: Path) -> dict[str, str | None]:
    return {
        d.name: (d / "freezer.state").read_text().strip() if (d / "freezer.state").exists() else None
        for d in sorted(parent.iterdir())
    }


def test_the_script_thaws_only_what_its_glob_matches(tmp_path):
    parent = tree(tmp_path)
    script = guard_script(parent / "gm-aaaaaaaa-*" / "freezer.state", "THAWED")
    done = subprocess.run(["/bin/sh", "-c", script], input=b"", cwd=tmp_path, check=False, timeout=10)
    assert done.returncode == 0
    assert states(parent) == {
        "gm-aaaaaaaa-1": "THAWED",
        "gm-aaaaaaaa-2": "THAWED",
        "gm-aaaaaaaa-3": None,
        "gm-bbbbbbbb-1": "FROZEN",
    }
    assert not (tmp_path / "pwned").exists()


def test_nothing_matching_is_not_an_error(tmp_path):
    script = guard_script(tmp_path / "none-*" / "cgroup.freeze", "0")
    assert subprocess.run(["/bin/sh", "-c", script], input=b"", check=False, timeout=10).returncode == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_the_guard_waits_for_its_stdin_to_end(tmp_path):
    parent = tree(tmp_path)
    guard = ThawGuard(parent / "gm-aaaaaaaa-*" / "freezer.state", "THAWED")
    await guard.ensure()
    first = guard.pid
    await guard.ensure()  # already running: the same one
    assert guard.pid == first
    await anyio.sleep(0.3)
    assert states(parent)["gm-aaaaaaaa-1"] == "FROZEN"  # still blocked on its stdin
    await guard.aclose()
    assert states(parent)["gm-aaaaaaaa-1"] == "THAWED"
    with pytest.raises(OSError, match="closing"):
        await guard.ensure()
