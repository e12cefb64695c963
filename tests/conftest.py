"""Shared fixtures. Integration tests use real runsc under a private root."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

TEST_BASE = Path("/run/gvisor-mcp-test")
CGROUP_PARENT = f"gvisor-mcp-test-{os.getpid()}"
"""One parent cgroup per pytest process: leftovers() must see only this
run's leaves, not those of another test run on the same host."""


OPT_OUT = "GVISOR_MCP_TESTS_WITHOUT_RUNSC"
"""Set to 1 to run what can run without runsc or root and skip the rest,
explicitly. Without it, selecting a test that needs them on a machine that
lacks them is an error: a green run must mean the sandbox suite ran. Tests
deselected with `-m "not runsc"` are not selected: the fast set needs
neither the opt-out nor root."""

ROOT_FIXTURES = {"sandbox_base", "small_tmpfs", "internet"}
"""Fixtures that need root (and, for sandbox_base and internet, runsc)."""

RUNSC_DIRS = {"integration", "protocol", "adversarial", "images"}
"""Directories of tests/ whose every test needs root, runsc or the host's
sandbox and image tools: marked `runsc` here, whatever their own markers say."""


def runsc_usable() -> str | None:
    """Why runsc tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("runsc") is None:
        return "runsc not installed (scripts/setup.sh installs it)"
    return None


def needs_runsc(item: pytest.Item) -> bool:
    return bool(item.get_closest_marker("runsc")) or bool(ROOT_FIXTURES & set(getattr(item, "fixturenames", ())))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `runsc` every test that needs root or runsc (by directory, or by the
    fixtures it uses), before `-m` selects: `-m "not runsc"` is then the set
    that runs anywhere, as any user."""
    tests = Path(__file__).parent
    for item in items:
        try:
            top = item.path.relative_to(tests).parts[0]
        except ValueError:
            continue
        if top in RUNSC_DIRS or ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.runsc)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail the run, clearly, when selected tests need runsc or root and this
    machine has neither; skip them only when GVISOR_MCP_TESTS_WITHOUT_RUNSC=1.

    At the end of collection, so only what `-m`/`-k` kept counts."""
    reason = runsc_usable()
    if reason is None or session.testsfailed:  # a collection error already fails the run
        return
    needing = [i for i in session.items if needs_runsc(i)]
    if not needing:
        return
    if os.environ.get(OPT_OUT) == "1":
        for item in needing:
            item.add_marker(pytest.mark.skip(reason=f"{reason}; skipped because {OPT_OUT}=1"))
        return
    raise pytest.UsageError(
        f"{len(needing)} of the selected tests need runsc and root, and here: {reason}. "
        "Run the suite as root after scripts/setup.sh (which installs runsc); run only the "
        'tests that need neither with `pytest -m "not runsc"`, or set '
        f"{OPT_OUT}=1 to skip the others (neither is a full test run)."
    )


def leftovers(base: Path, cgroup_parent: str = CGROUP_PARENT) -> dict[str, list[str]]:
    """Everything a finished test must not leave behind."""
    root = base / "runsc"
    out: dict[str, list[str]] = {}
    if root.exists():
        r = subprocess.run(["runsc", f"--root={root}", "list", "-quiet"], capture_output=True, text=True)
        ids = [x for x in r.stdout.split() if x]
        if ids:
            out["runsc list"] = ids
        files = [n for n in os.listdir(root)]
        if files:
            out["runsc state files"] = files
    bundles = base / "bundles"
    spares: list[str] = []
    if bundles.exists():
        left = [n for n in os.listdir(bundles) if not n.startswith(".")]
        if left:
            out["bundles"] = left
        # Cold runs' bundles made ahead (sandbox/spares.py), with, for a
        # started spare, its cgroup leaf and its waiting launcher: listed
        # here too ("<spare> (cgroup ...)", "<spare> (process ...)").
        spares = [n for n in os.listdir(bundles) if n.startswith(".spare-")]
    spare_ids = {n.removeprefix(".spare-"): n for n in spares}
    cg = []
    for ctl in Path("/sys/fs/cgroup").iterdir():
        d = ctl / cgroup_parent
        if d.is_dir() and not ctl.is_symlink():
            for p in d.iterdir():
                if p.is_dir() and p.name in spare_ids:
                    spares.append(f"{spare_ids[p.name]} (cgroup {ctl.name})")
                elif p.is_dir():
                    cg.append(f"{ctl.name}/{p.name}")
    if cg:
        out["cgroups"] = cg
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"--root={root}".encode() in cmd:
                spare = next((n for i, n in spare_ids.items() if i.encode() in cmd.split(b"\0")), None)
                if spare is not None:
                    spares.append(f"{spare} (process {pid})")
                else:
                    procs.append(pid)
    if procs:
        out["processes"] = procs
    if spares:
        out["spare bundles"] = spares
    return out


def seen_by(pid: int, path: Path) -> Path:
    """`path` as process `pid` sees it: a server mounts workspaces in a mount
    namespace of its own (mountns.py), so from the test's namespace a
    workspace directory is the empty mountpoint underneath."""
    return Path(f"/proc/{pid}/root") / path.resolve().relative_to("/")


def workspace_leftovers(*directories: Path, wait: float = 10.0) -> list[str]:
    """Workspace mounts (in this namespace) and loop devices (in any) of images
    under `directories`, once the kernel has had `wait` seconds to detach the
    loop devices of a mount namespace whose last process just exited."""
    from gvisor_mcp import workspace

    dirs = [d.resolve() for d in directories if d.exists()]

    def under(p: Path) -> bool:
        return any(d == p or d in p.parents for d in dirs)

    deadline = time.monotonic() + wait
    while True:
        left = [f"mount {mp}" for mp, _ in workspace.loop_mounts() if under(mp)]
        left += [f"{dev} -> {backing}" for dev, backing in workspace.loop_devices() if under(backing)]
        if not left or time.monotonic() >= deadline:
            return sorted(left)
        time.sleep(0.1)


@pytest.fixture(scope="session")
def _etc_tree() -> Path:
    """The built-in image's /etc (sandbox/rootfs.py write_etc), built once per
    pytest process: each Manager start builds it in its own bundle directory,
    and every test has a fresh one. 721 entries (/etc/ssl/certs' links)
    cost seconds per test under a loaded disk journal (docs/testing.md).
    Content-addressed: a Manager that computes another digest (the host's
    /etc changed meanwhile) builds its own, as without this."""
    if runsc_usable():  # sandbox_base skips (only with the opt-out)
        yield Path("/nonexistent")
        return
    from gvisor_mcp.sandbox.rootfs import write_etc

    home = TEST_BASE / f"etc-{os.getpid()}"
    final = write_etc(home / ".image" / "etc")
    yield final
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def sandbox_base(_etc_tree: Path) -> Path:
    reason = runsc_usable()
    if reason:  # only reachable with the opt-out (see pytest_collection_modifyitems)
        pytest.skip(reason)
    base = TEST_BASE / uuid.uuid4().hex[:8]
    base.mkdir(parents=True)
    (base / "bundles").mkdir(mode=0o700)  # as the Manager makes it
    image = base / "bundles" / ".image"
    image.mkdir()
    # write_etc finds this digest's tree complete and only points .image/etc at it
    os.symlink(_etc_tree, image / _etc_tree.name)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_cgroup_parent():
    """The per-run parent cgroups go at the end (only when empty: a leaf left
    behind stays visible to whoever looks)."""
    yield
    for ctl in Path("/sys/fs/cgroup").iterdir():
        d = ctl / CGROUP_PARENT
        if d.is_dir() and not ctl.is_symlink():
            try:
                d.rmdir()
            except OSError:
                pass


@pytest.fixture(scope="session")
def internet():
    """The test internet (tests/internet.py): built once per pytest process."""
    reason = runsc_usable()
    if reason:
        pytest.skip(reason)
    from .internet import start

    net = start(TEST_BASE / f"internet-{os.getpid()}")
    yield net
    net.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 8 MiB tmpfs: a disk that fills up (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")  # only reachable with the opt-out
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(directory: Path, name: str = "filler") -> Path:
    """Write to `directory` until its filesystem is full; the filler's path."""
    path = directory / name
    chunk = b"\0" * (64 * 1024)
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
    with open(path, "ab", buffering=0) as f:  # the last partial chunk too
        for _ in range(64):
            try:
                f.write(b"\0" * 1024)
            except OSError:
                break
    return path
