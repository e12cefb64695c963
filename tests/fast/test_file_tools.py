"""The file tools on a project (a plain directory: no loop-mounted workspace,
so no root), as an MCP client sees them."""

from __future__ import annotations

import base64
import os

import anyio

from .conftest import structured, text


async def test_text_and_binary_round_trips_are_exact_and_audited(fast):
    blob = bytes(range(256)) * 3
    async with fast() as srv, srv.client() as client:
        w = structured(await client.call_tool("write_file", {"path": "/project/src/a.txt", "content": "héllo\n"}))
        assert w == {"path": "/project/src/a.txt", "bytes": 7, "created": True, "mode": "0644"}
        host = srv.project / "src" / "a.txt"
        assert host.read_bytes() == "héllo\n".encode()
        st = host.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())  # the policy's sandbox user
        r = structured(await client.call_tool("read_file", {"path": "/project/src/a.txt"}))
        assert (r["data"], r["escaped"], r["next_offset"], r["total_bytes"]) == ("héllo\n", False, None, 7)
        await client.call_tool(
            "write_file",
            {"path": "/project/bin", "content": base64.b64encode(blob).decode(), "encoding": "base64", "mode": "755"},
        )
        assert (srv.project / "bin").read_bytes() == blob and (srv.project / "bin").stat().st_mode & 0o777 == 0o755
        exact = structured(await client.call_tool("read_file", {"path": "/project/bin", "encoding": "base64"}))
        assert base64.b64decode(exact["data"]) == blob
        shown = structured(await client.call_tool("read_file", {"path": "/project/bin", "length": 4}))
        assert shown["data"] == "\\x00\\x01\\x02\\x03" and shown["escaped"] is True and shown["next_offset"] == 4
    writes = [(a["tool"], a["path"], a["bytes"]) for a in srv.audit() if a.get("tool")]
    assert writes == [("write_file", "/project/src/a.txt", 7), ("write_file", "/project/bin", 768)]


async def test_a_file_larger_than_max_read_pages_back(fast):
    data = os.urandom(150_000)
    async with fast() as srv, srv.client() as client:
        (srv.project / "big").write_bytes(data)
        got, offset, pages = b"", 0, 0
        while offset is not None:
            r = await client.call_tool(
                "read_file", {"path": "/project/big", "offset": offset, "length": 65536, "encoding": "base64"}
            )
            page = structured(r)
            got += base64.b64decode(page["data"])
            offset, pages = page["next_offset"], pages + 1
        assert got == data and pages == 3
        over = await client.call_tool("read_file", {"path": "/project/big", "length": 65537})
        assert over.is_error and "65536" in text(over)  # the schema's maximum: files.max_read


async def test_list_files_shows_types_and_stops_at_max_list(fast):
    async with fast() as srv, srv.client() as client:
        (srv.project / "d").mkdir()
        (srv.project / "d" / "f").write_text("x")
        os.symlink("/etc/passwd", srv.project / "link")
        listing = structured(await client.call_tool("list_files", {"path": "/project", "depth": 2}))
        entries = {e["path"]: (e["type"], e.get("target")) for e in listing["entries"]}
        assert entries == {
            "/project/d": ("directory", None),
            "/project/d/f": ("file", None),
            "/project/link": ("symlink", "/etc/passwd"),
        }
        assert listing["truncated"] is False
        for i in range(60):
            (srv.project / "d" / f"n{i:02d}").write_text("")
        many = await client.call_tool("list_files", {"path": "/project/d"})
        assert structured(many)["truncated"] is True and len(structured(many)["entries"]) == 50
        assert "files.max_list=50" in text(many)


async def test_paths_never_lead_out_of_the_project(fast):
    async with fast() as srv, srv.client() as client:
        os.symlink("/etc", srv.project / "etc")
        for path, why in (
            ("/project/../etc/passwd", "contains '..'"),
            ("/etc/passwd", "outside what the file tools reach: /project"),
            ("/project/etc/passwd", "goes through a symbolic link"),
        ):
            r = await client.call_tool("read_file", {"path": path})
            assert r.is_error and why in text(r), path
            assert "root:" not in text(r)
        w = await client.call_tool("write_file", {"path": "/project/etc/evil", "content": "x"})
        assert w.is_error and "symbolic link" in text(w) and not os.path.exists("/etc/evil")
        rel = await client.call_tool("read_file", {"path": "notes.txt"})
        assert rel.is_error and "mounts no workspace" in text(rel) and "project" in text(rel)
        d = await client.call_tool("delete_file", {"path": "/project/etc"})
        assert not d.is_error and structured(d)["removed"] == "symlink"
        assert os.path.isdir("/etc") and not (srv.project / "etc").exists()


async def test_a_fifo_is_an_error_at_once(fast):
    async with fast() as srv, srv.client() as client:
        os.mkfifo(srv.project / "pipe")
        with anyio.fail_after(10):  # never blocks waiting for a writer
            r = await client.call_tool("read_file", {"path": "/project/pipe"})
            w = await client.call_tool("write_file", {"path": "/project/pipe", "content": "x"})
        assert r.is_error and "pipe is a fifo, not a regular file" in text(r)
        assert w.is_error and "pipe is a fifo" in text(w) and "delete it first" in text(w)


async def test_bad_writes_name_the_limit_and_leave_everything_as_it_was(fast):
    async with fast() as srv, srv.client() as client:
        (srv.project / "keep").write_text("old")
        too_big = await client.call_tool("write_file", {"path": "/project/keep", "content": "x" * 65537})
        assert too_big.is_error and "files.max_write" in text(too_big)
        bad64 = await client.call_tool(
            "write_file", {"path": "/project/keep", "content": "not base64!", "encoding": "base64"}
        )
        assert bad64.is_error and "base64" in text(bad64)
        bad_mode = await client.call_tool("write_file", {"path": "/project/keep", "content": "x", "mode": "999"})
        assert bad_mode.is_error
        (srv.project / "dir").mkdir()
        (srv.project / "dir" / "f").write_text("")
        not_empty = await client.call_tool("delete_file", {"path": "/project/dir"})
        assert not_empty.is_error and "recursive" in text(not_empty)
        assert (srv.project / "keep").read_text() == "old"
        assert sorted(p.name for p in srv.project.iterdir()) == ["dir", "keep"]  # no temp file left
        gone = structured(await client.call_tool("delete_file", {"path": "/project/dir", "recursive": True}))
        assert gone["removed"] == "directory" and not (srv.project / "dir").exists()


async def test_a_read_only_project_refuses_writes(fast):
    extra = "  reader:\n    projects:\n      app: {path: PROJECT, mount: /project, read_only: true}\n"
    async with fast() as srv:
        pass
    async with fast(policy_extra=extra.replace("PROJECT", str(srv.project))) as srv, srv.client("reader") as client:
        (srv.project / "f").write_text("mine")
        assert structured(await client.call_tool("read_file", {"path": "/project/f"}))["data"] == "mine"
        for call in (("write_file", {"path": "/project/f", "content": "x"}), ("delete_file", {"path": "/project/f"})):
            r = await client.call_tool(*call)
            assert r.is_error and "read-only" in text(r)
        assert (srv.project / "f").read_text() == "mine"
