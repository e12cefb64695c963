"""The file tools' cluster contract without Ray: a FileRequest as an agent
checks it (cluster/agent_files.py), one FileOp applied as both sides apply
it (fileop.py), and where the coordinator homes a workspace a file tool
touches first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gvisor_mcp import files
from gvisor_mcp.cluster.agent_files import check_request, checked_ref, parse_request, workspace_dir
from gvisor_mcp.cluster.coordinator import Coordinator
from gvisor_mcp.cluster.spec import SpecRefused, WorkspaceRef, default_ceilings
from gvisor_mcp.fileop import FileOp, apply_at

WS = {"tenant": "bob", "scope": "session", "session": "s1", "mount": "/workspace", "size_mb": 16}
GOOD = {"tenant": "bob", "workspace": WS, "owner": {"uid": 1000, "gid": 1000}}


def refused(request: dict) -> str:
    with pytest.raises(SpecRefused) as e:
        check_request(parse_request(request), default_ceilings())
    return str(e.value)


def test_a_good_request_passes_and_every_forgery_is_named():
    check_request(parse_request({**GOOD, "op": {"kind": "read", "path": "a/b", "length": 10}}), default_ceilings())
    assert "path: " in refused({**GOOD, "op": {"kind": "read", "path": "../x", "length": 1}})
    assert "is absolute here" in refused({**GOOD, "op": {"kind": "delete", "path": "/etc"}})
    assert "session='../..'" in refused({**GOOD, "workspace": {**WS, "session": "../.."}})
    assert "tenant='..'" in refused({**GOOD, "tenant": "..", "workspace": {**WS, "tenant": ".."}})
    assert "not the file request's tenant" in refused({**GOOD, "workspace": {**WS, "tenant": "eve"}})
    assert "read length=" in refused({**GOOD, "op": {"kind": "read", "length": 1 << 40}})
    big = b"x" * (default_ceilings().file_write_bytes + 1)
    assert "write of" in refused({**GOOD, "op": {"kind": "write", "path": "f", "data": big}})
    assert "list limit=" in refused({**GOOD, "op": {"kind": "list", "limit": 10**7}})
    with pytest.raises(SpecRefused, match="Extra inputs"):
        parse_request({**GOOD, "host_path": "/"})
    with pytest.raises(SpecRefused, match="op.depth"):
        parse_request({**GOOD, "op": {"kind": "list", "depth": 99}})


def test_a_reference_names_a_directory_beneath_the_root(tmp_path):
    ws = checked_ref(WS, default_ceilings())
    assert workspace_dir(ws, tmp_path) == tmp_path.resolve() / "bob" / "sessions" / "s1"
    for bad in ({**WS, "session": "../../x"}, {**WS, "tenant": "../.."}, {**WS, "scope": "host"}):
        with pytest.raises(SpecRefused):
            checked_ref(bad, default_ceilings())


def test_of_path_is_how_runs_and_file_tools_name_a_workspace(tmp_path):
    root = tmp_path.resolve()
    shared = WorkspaceRef.of_path(root, "bob", root / "bob" / "shared", "/w", 8)
    assert shared is not None and shared.key == "bob/shared" and shared.scope == "tenant"
    session = WorkspaceRef.of_path(root, "bob", root / "bob" / "sessions" / "s1", "/w", 8)
    assert session is not None and session.key == "bob/s1"
    assert WorkspaceRef.of_path(root, "bob", root / "eve" / "shared", "/w", 8) is None
    assert WorkspaceRef.of_path(root, "bob", Path("/etc"), "/w", 8) is None


def test_one_op_applied_as_the_agent_applies_it(tmp_path):
    uid, gid = os.getuid(), os.getgid()
    done = apply_at(str(tmp_path), FileOp(kind="write", path="d/f.txt", data=b"hello", uid=uid, gid=gid))
    assert done.created and done.size == 5
    assert apply_at(str(tmp_path), FileOp(kind="read", path="d/f.txt", offset=1, length=3)).data == b"ell"
    entries, truncated = apply_at(str(tmp_path), FileOp(kind="list", depth=2, limit=10))
    assert [e.path for e in entries] == [("d",), ("d", "f.txt")] and not truncated
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(files.FileError) as e:
        apply_at(str(tmp_path), FileOp(kind="read", path="link", length=10))
    assert e.value.kind == "symlink"
    assert apply_at(str(tmp_path), FileOp(kind="delete", path="d", recursive=True)) == "directory"
    assert FileOp.at(("a", "b"), "read", length=1).parts == ("a", "b")
    assert FileOp.at((), "list", limit=1).parts == ()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_workspace_without_a_home_is_placed_as_a_run_would_be(anyio_backend):
    c = Coordinator()
    lease = await c.acquire("fe1", "bob", {"a": 2, "b": 2})
    busy = lease["host"]
    free = "b" if busy == "a" else "a"
    assert await c.place("bob/s1", {"a": 2, "b": 2}) == free  # the most free slots
    assert await c.place("bob/s1", {"a": 2, "b": 2}) == free  # then it stays there
    assert await c.place("bob/s2", {}) is None
    # A run that mounts it goes to its home.
    grant = await c.acquire("fe1", "bob", {"a": 2, "b": 2}, workspace="bob/s1")
    assert grant["host"] == free
    await c.forget_home("bob/s1")
    assert await c.home_of("bob/s1") is None
