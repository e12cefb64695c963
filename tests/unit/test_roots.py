"""roots.py: which directory a tool path reaches, and agent-created workspaces."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gvisor_mcp.files import FileError
from gvisor_mcp.roots import AgentWorkspaces, NoSuchWorkspace, Root, locate, sandbox_path

WS = Root("workspace", "/workspace", Path("/srv/ws"), False, "workspace")
PROJECT = Root("project", "/project", Path("/home/me/app"), False, "project")
NESTED = Root("docs", "/project-docs", Path("/srv/docs"), True, "project")
ROOTS = [WS, PROJECT, NESTED]


@pytest.mark.parametrize(
    ("path", "root", "parts"),
    [
        ("a/b.txt", WS, ("a", "b.txt")),
        ("./a//b.txt", WS, ("a", "b.txt")),
        ("/workspace", WS, ()),
        ("/workspace/a", WS, ("a",)),
        ("/project/src/x.py", PROJECT, ("src", "x.py")),
        ("/project-docs/README", NESTED, ("README",)),  # a prefix of the name is not its mount
        ("/project//", PROJECT, ()),
    ],
)
def test_paths_map_to_their_root(path: str, root: Root, parts: tuple[str, ...]) -> None:
    got_root, got_parts = locate(ROOTS, path, "no workspace")
    assert (got_root, got_parts) == (root, parts)
    assert sandbox_path(got_root, got_parts) == (root.mount + "/" + "/".join(parts) if parts else root.mount)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("../etc/passwd", "'..'"),
        ("/workspace/../etc", "'..'"),
        ("a/../../b", "'..'"),
        ("/etc/passwd", "outside"),
        ("/workspacex/a", "outside"),
        ("/srv/ws/a", "outside"),
        ("/proc/self/root/etc", "outside"),
        ("", "empty"),
        ("a\x00b", "NUL"),
    ],
)
def test_paths_that_lead_nowhere_are_refused(path: str, fragment: str) -> None:
    with pytest.raises(FileError) as e:
        locate(ROOTS, path, "no workspace")
    assert fragment in str(e.value)


def test_relative_paths_without_a_workspace_say_how_to_get_one() -> None:
    with pytest.raises(FileError) as e:
        locate([PROJECT], "a.txt", "create one with create_workspace")
    assert "create_workspace" in str(e.value)
    assert locate([PROJECT], "/project/a", "x") == (PROJECT, ("a",))


def test_created_workspaces_are_bounded_unguessable_and_expire() -> None:
    reg = AgentWorkspaces(idle_seconds=3600, limit=3)
    ids = [reg.create().handle for _ in range(3)]
    assert len(set(ids)) == 3 and all(i.startswith("ws_") and len(i) == 35 for i in ids)
    with pytest.raises(NoSuchWorkspace, match="at most 3"):
        reg.create()
    assert reg.use(ids[0]) == ids[0]
    with pytest.raises(NoSuchWorkspace) as unknown:
        reg.use("ws_" + "0" * 32)
    with pytest.raises(NoSuchWorkspace) as other:
        reg.use("../../etc")
    assert str(unknown.value).replace("ws_" + "0" * 32, "X") == str(other.value).replace("../../etc", "X")
    reg.entries[ids[1]].last_used = time.monotonic() - 7200
    reg.entries[ids[2]].last_used = time.monotonic() - 7200
    assert reg.idle(busy={ids[2]}) == [ids[1]]  # a workspace a command still runs in is kept
    reg.forget(ids[1])
    assert reg.create().handle not in ids
