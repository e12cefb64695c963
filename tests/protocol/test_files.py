"""The file tools, resources, projects and named workspaces, through the SDK's
client over real stdio (real runsc underneath for the commands).

The file tools never boot a sandbox; commands before and after them check
that both see the same files, with the right owner.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import anyio
import pytest

from .conftest import BIN, full_receipt, run, structured, text

pytestmark = pytest.mark.runsc

FAST = ("--pool-size", "0")
HANG_GUARD = 60
"""Not a timing assertion: only stops a test that would otherwise hang forever."""


async def call(c, tool: str, **args):
    return await c.call_tool(tool, args)


async def ok(c, tool: str, **args) -> dict:
    r = await call(c, tool, **args)
    assert not r.is_error, text(r)
    return structured(r)


async def refused(c, tool: str, *fragments: str, **args) -> str:
    r = await call(c, tool, **args)
    assert r.is_error, (tool, args, text(r))
    msg = text(r)
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


async def sh(c, command: str) -> dict:
    r = await run(c, command=command)
    s = structured(r)
    assert s["status"] == "exited", text(r)
    return s


def policy_file(tmp_path, body: str):
    path = tmp_path / "policy.yaml"
    path.write_text(body)
    return path


async def test_file_tool_schemas_show_the_policy(serve, tmp_path):
    policy = policy_file(tmp_path, "version: 1\nfiles: {max_read: 128KiB, max_write: 64KiB, max_list: 50}\n")
    async with serve("--policy", str(policy), *FAST) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    read, write, listing = tools["read_file"], tools["write_file"], tools["list_files"]
    assert read.input_schema["properties"]["length"]["maximum"] == 128 * 1024
    assert "131072" in read.description and "files.max_read" in read.description
    content = write.input_schema["properties"]["content"]
    assert content["maxLength"] >= 64 * 1024 and "65536" in content["description"]
    assert "files.max_write" in write.description and "files.max_list" in listing.description
    assert "/workspace" in read.description  # what the tools reach
    assert write.annotations.destructive_hint and read.annotations.read_only_hint
    # stdio: the workspace is chosen at start, never by a tool argument.
    assert all("workspace" not in t.input_schema["properties"] for t in tools.values())
    assert "create_workspace" not in tools
    for name in ("read_file", "write_file", "list_files", "delete_file"):
        assert tools[name].output_schema is not None


async def test_text_and_binary_round_trips_are_byte_exact_and_shared_with_commands(serve):
    code = "print(\"it's $(rm -rf /)\")\n\tif a < b && c > 'd': `x`\n# é ü 漢字 🚀\n"
    blob = bytes(range(256)) * 4
    async with serve(*FAST) as c:
        w = await ok(c, "write_file", path="src/app.py", content=code)
        assert w == {"path": "/workspace/src/app.py", "bytes": len(code.encode()), "created": True, "mode": "0644"}
        await ok(
            c, "write_file", path="/workspace/data.bin", content=base64.b64encode(blob).decode(), encoding="base64"
        )
        r = await ok(c, "read_file", path="src/app.py")
        assert r["data"] == code and not r["escaped"] and r["next_offset"] is None
        r = await ok(c, "read_file", path="data.bin", encoding="base64")
        assert base64.b64decode(r["data"]) == blob and r["total_bytes"] == len(blob)
        r = await ok(c, "read_file", path="data.bin")
        assert r["escaped"]  # text mode is for reading: \xNN escapes, said so
        # The next command sees the same bytes, owned by the sandbox user, and can change them.
        s = await sh(
            c,
            "sha256sum src/app.py data.bin | cut -c1-64; stat -c '%u:%g %a' src src/app.py; "
            "echo appended >> src/app.py && echo written > by-command.txt && chmod 600 data.bin && echo ok",
        )
        lines = s["stdout"].splitlines()
        assert lines[:2] == [hashlib.sha256(code.encode()).hexdigest(), hashlib.sha256(blob).hexdigest()]
        assert lines[2:] == ["1000:1000 755", "1000:1000 644", "ok"], s
        r = await ok(c, "read_file", path="src/app.py")
        assert r["data"] == code + "appended\n"
        assert (await ok(c, "read_file", path="by-command.txt"))["data"] == "written\n"
        # Replacing a file keeps its mode; an explicit mode wins.
        assert (await ok(c, "write_file", path="data.bin", content="x"))["mode"] == "0600"
        assert (await ok(c, "write_file", path="run.sh", content="#!/bin/sh\necho run\n", mode="755"))["mode"] == "0755"
        assert (await sh(c, "./run.sh"))["stdout"] == "run\n"
        listing = await ok(c, "list_files", depth=2)
        paths = {e["path"]: e for e in listing["entries"]}
        assert paths["/workspace/src"]["type"] == "directory" and paths["/workspace/src/app.py"]["type"] == "file"
        assert paths["/workspace/run.sh"]["mode"] == "0755" and not listing["truncated"]
        gone = await ok(c, "delete_file", path="src", recursive=True)
        assert gone["removed"] == "directory"
        assert (await sh(c, "ls -A"))["stdout"] == "by-command.txt\ndata.bin\nrun.sh\n"


async def test_a_10_mb_file_is_paged_back_exactly(serve, tmp_path):
    policy = policy_file(tmp_path, "version: 1\nfiles: {max_read: 1MiB}\n")
    async with serve("--policy", str(policy), *FAST) as c:
        s = await sh(c, "head -c 10000000 /dev/urandom > big && sha256sum big | cut -c1-64")
        want = s["stdout"].strip()
        got, offset, pages = bytearray(), 0, 0
        while offset is not None:
            r = await ok(c, "read_file", path="big", offset=offset, length=1024 * 1024, encoding="base64")
            got += base64.b64decode(r["data"])
            assert r["total_bytes"] == 10_000_000 and r["offset"] == offset
            offset, pages = r["next_offset"], pages + 1
        assert pages == 10 and len(got) == 10_000_000
        assert hashlib.sha256(got).hexdigest() == want
        await refused(c, "read_file", "1048576", path="big", length=1024 * 1024 + 1)


async def test_traversal_and_planted_symlinks_never_lead_out(serve, sandbox_base):
    state = sandbox_base / "state"
    image = state / "workspaces" / ".images" / "default" / "named" / "default.img"
    mountpoint = state / "workspaces" / "default" / "named" / "default"
    passwd = Path("/etc/passwd").read_bytes()
    async with serve(*FAST) as c:
        await ok(c, "write_file", path="real.txt", content="mine\n")
        before = image.stat()
        await sh(
            c,
            f"ln -s /etc/passwd l1; ln -s /etc l2; ln -s /proc/self/root l3; ln -s {image} img; "
            f"ln -s {mountpoint} ws; ln -s .. up; mkdir d; ln -s /etc d/e; echo planted",
        )
        for path in (
            "l1",
            "l2/passwd",
            "l3/etc/passwd",
            "img",
            "ws/real.txt",
            "up/real.txt",
            "d/e/passwd",
            "/workspace/l2/passwd",
        ):
            await refused(c, "read_file", "symbolic link", path=path)
        for path in ("../../etc/passwd", "/workspace/../etc/passwd", "d/../../x"):
            await refused(c, "read_file", "'..'", path=path)
        for path in ("/etc/passwd", str(image), str(mountpoint / "real.txt"), "/proc/self/root/etc/passwd"):
            await refused(c, "read_file", "outside what the file tools reach", path=path)
        for path in ("l2/evil", "l3/tmp/evil", "img", "l1", "d/e/evil"):
            await refused(c, "write_file", "symbolic link", path=path, content="x")
        await refused(c, "write_file", "outside", path="/etc/evil", content="x")
        for path in ("l2", "l3", "d/e"):
            await refused(c, "list_files", "symbolic link", path=path)
        await refused(c, "delete_file", "symbolic link", path="l2/passwd")
        # Listing shows the links for what they are, and deleting one removes the link only.
        entries = {e["path"]: e for e in (await ok(c, "list_files"))["entries"]}
        assert entries["/workspace/l2"]["type"] == "symlink" and entries["/workspace/l2"]["target"] == "/etc"
        assert (await ok(c, "delete_file", path="l1"))["removed"] == "symlink"
        assert (await ok(c, "read_file", path="real.txt"))["data"] == "mine\n"
    assert Path("/etc/passwd").read_bytes() == passwd
    after = image.stat()
    assert (after.st_size, after.st_mode) == (before.st_size, before.st_mode)
    assert not os.path.exists("/etc/evil") and not os.path.exists("/tmp/evil")


async def test_fifos_and_sockets_are_an_error_at_once(serve, tmp_path):
    """A FIFO a command makes lives inside gVisor (runsc keeps FIFOs and
    sockets of bind mounts in the sandbox unless --host-fifo/--host-uds):
    read_file finds no such file. A FIFO or socket on the host (here in a
    project) is refused as not a regular file. Neither ever blocks."""
    project = tmp_path / "project"
    project.mkdir()
    os.mkfifo(project / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(project / "sock"))
    try:
        async with serve("--project", str(project), *FAST) as c:
            await sh(c, "mkfifo p && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('s')\"")
            with anyio.fail_after(HANG_GUARD):
                await refused(c, "read_file", "does not exist", path="p")
                await refused(c, "read_file", "does not exist", path="s")
                await refused(c, "read_file", "fifo, not a regular file", path="/project/pipe")
                await refused(c, "read_file", "socket, not a regular file", path="/project/sock")
                await refused(c, "write_file", "not a regular file", path="/project/pipe", content="x")
            assert (await ok(c, "list_files", path="/project"))["entries"][0]["type"] == "fifo"
    finally:
        sock.close()
    assert (project / "pipe").is_fifo()


async def test_bad_input_names_the_limit_and_leaves_the_workspace_as_it_was(serve, tmp_path):
    policy = policy_file(tmp_path, "version: 1\nworkspace: {size: 16MiB}\nfiles: {max_write: 20MiB}\n")
    async with serve("--policy", str(policy), *FAST) as c:
        await ok(c, "write_file", path="keep.txt", content="keep\n")
        before = await ok(c, "list_files", depth=4)
        await refused(c, "write_file", "files.max_write", "20971520", path="x", content="a" * (20 * 1024 * 1024 + 1))
        await refused(c, "write_file", "not valid base64", path="x", content="!!!not base64", encoding="base64")
        await refused(
            c,
            "write_file",
            "16MiB",
            "workspace.size",
            "Nothing was written",
            path="deep/new/dir/huge",
            content=base64.b64encode(b"\0" * (18 * 1024 * 1024)).decode(),
            encoding="base64",
        )
        await refused(
            c,
            "write_file",
            "16MiB",
            path="keep.txt",
            content=base64.b64encode(b"\1" * (18 * 1024 * 1024)).decode(),
            encoding="base64",
        )
        await refused(c, "write_file", "permission mode", path="x", content="y", mode="4755")
        await refused(c, "write_file", "directory", path=".", content="y")
        await refused(c, "read_file", "does not exist", path="nope")
        await refused(c, "delete_file", "root itself", path="/workspace")
        # Nothing half-written, no temporary file, no directory left by the failed writes.
        assert await ok(c, "list_files", depth=4) == before
        assert (await ok(c, "read_file", path="keep.txt"))["data"] == "keep\n"
        s = await sh(c, "ls -A; df -k . | tail -1")
        assert s["stdout"].splitlines()[0] == "keep.txt"


async def test_project_mount_round_trip(serve, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "hello.txt").write_text("from the host\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the project\n")
    os.symlink(str(secret), project / "leak")
    os.symlink("../secret.txt", project / "src" / "up")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README").write_text("read me\n")
    # The user's own project: owned by the uid commands run as (policy defaults.user, 1000).
    for p in (project, project / "src", project / "src" / "hello.txt"):
        os.chown(p, 1000, 1000)
    # The operator may name a path through a symlink of their own: followed (only that).
    os.symlink(str(docs), tmp_path / "docs-link")
    policy = policy_file(tmp_path, f"version: 1\nprojects:\n  docs: {{path: {tmp_path / 'docs-link'}}}\n")
    async with serve("--policy", str(policy), "--project", str(project), *FAST) as c:
        r = await run(
            c,
            command="cat /project/src/hello.txt && echo made > /project/made.txt && "
            "cat /projects/docs/README; cat /project/leak; cat /project/src/up; "
            "touch /projects/docs/x; echo end",
        )
        s = structured(r)
        assert s["stdout"] == "from the host\nread me\nend\n", (s["stdout"], s["stderr"])
        assert "outside the project" not in s["stdout"] + s["stderr"]
        mounts = {m["name"]: m for m in (await full_receipt(c, s["result_id"]))["entries"][-1]["granted"]}
        assert mounts["project"] == {"name": "project", "mount": "/project", "access": "read-write"}
        assert mounts["docs"]["access"] == "read-only" and mounts["workspace"]["kept"]
        # The file tools reach the project the same way, with the same refusals.
        assert (await ok(c, "read_file", path="/project/made.txt"))["data"] == "made\n"
        await ok(c, "write_file", path="/project/src/new.py", content="x = 1\n")
        assert (await ok(c, "read_file", path="/projects/docs/README"))["data"] == "read me\n"
        await refused(c, "read_file", "symbolic link", path="/project/leak")
        await refused(c, "read_file", "symbolic link", path="/project/src/up")
        await refused(c, "write_file", "read-only", path="/projects/docs/x", content="x")
        await refused(c, "delete_file", "read-only", path="/projects/docs/README")
        await refused(c, "read_file", "'..'", path="/project/../etc/passwd")
        assert (await sh(c, "cat /project/src/new.py"))["stdout"] == "x = 1\n"
    assert (project / "made.txt").read_text() == "made\n"
    new = project / "src" / "new.py"
    assert new.read_text() == "x = 1\n" and (new.stat().st_uid, new.stat().st_gid) == (1000, 1000)
    assert sorted(p.name for p in docs.iterdir()) == ["README"] and secret.read_text() == "outside the project\n"


def workspace_cli(state, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), "workspace", *args, "--state-dir", str(state)], capture_output=True, text=True)


async def test_the_stdio_workspace_survives_a_restart_and_is_named(serve, sandbox_base, tmp_path):
    state = tmp_path / "state"
    async with serve(*FAST, state_dir=state) as c:
        await ok(c, "write_file", path="notes.txt", content="remember me\n")
        await sh(c, "echo by command >> notes.txt")
    async with serve(*FAST, state_dir=state) as c:
        assert (await ok(c, "read_file", path="notes.txt"))["data"] == "remember me\nby command\n"
        assert (await sh(c, "cat notes.txt"))["stdout"] == "remember me\nby command\n"
        listed = workspace_cli(state, "list")
        assert "default/named/default" in listed.stdout and "in use" in listed.stdout, listed
        busy = workspace_cli(state, "rm", "default/named/default")
        assert busy.returncode == 1 and "in use" in busy.stderr
    async with serve("--workspace", "other", *FAST, state_dir=state) as c:
        await refused(c, "read_file", "does not exist", path="notes.txt")
        await ok(c, "write_file", path="other.txt", content="o")
        resources = await c.list_resources()
        assert [r.uri for r in resources.resources] == ["workspace:///other.txt"]
    listed = workspace_cli(state, "list")
    assert "default/named/default" in listed.stdout and "default/named/other" in listed.stdout
    assert "in use" not in listed.stdout
    du = workspace_cli(state, "du")
    assert du.returncode == 0 and "total" in du.stdout
    gone = workspace_cli(state, "rm", "default/named/other")
    assert gone.returncode == 0 and "removed default/named/other" in gone.stdout
    assert "default/named/other" not in workspace_cli(state, "list").stdout
    missing = workspace_cli(state, "rm", "default/named/nope")
    assert missing.returncode == 1 and "workspace list" in missing.stderr
    async with serve(*FAST, state_dir=state) as c:  # the default one is still there
        assert (await ok(c, "read_file", path="notes.txt"))["total_bytes"] == 23


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--workspace", "../x"), "not a valid name"),
        (("--project", "/nonexistent/project"), "not a directory"),
        (("--project", "/"), "cannot be mounted"),
        (("--transport", "http", "--tokens", "{tokens}", "--project", "/tmp"), "--project is for stdio"),
    ],
)
def test_serve_refuses_bad_workspace_and_project_flags(sandbox_base, tmp_path, flags, expected):
    tokens = tmp_path / "tokens.yaml"  # a valid (empty) tokens file: the tokens are checked first
    tokens.write_text("tokens: []\n")
    flags = tuple(f.replace("{tokens}", str(tokens)) for f in flags)
    r = subprocess.run(
        [str(BIN), "serve", "--state-root", str(sandbox_base), "--state-dir", str(tmp_path / "s"), *flags],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2 and expected in r.stderr and r.stdout == ""


def test_serve_refuses_a_named_workspace_under_a_tenant_scope(sandbox_base, tmp_path):
    policy = policy_file(tmp_path, "version: 1\nworkspace: {scope: tenant}\n")
    r = subprocess.run(
        [
            str(BIN),
            "serve",
            "--policy",
            str(policy),
            "--workspace",
            "w",
            "--state-root",
            str(sandbox_base),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert r.returncode == 2 and "workspace.scope: tenant" in r.stderr


async def test_workspace_resources(serve):
    async with serve(*FAST) as c:
        assert (await c.list_resources()).resources == []  # nothing made yet, nothing created
        await ok(c, "write_file", path="docs/read me.md", content="# hi\n")
        await ok(c, "write_file", path="img.bin", content=base64.b64encode(b"\x89PNG\0\1").decode(), encoding="base64")
        await ok(c, "write_file", path="esc.txt", content="a\x1b[31mred\n")
        await sh(c, "ln -s /etc/passwd link; mkdir -p empty")
        listed = {r.uri: r for r in (await c.list_resources()).resources}
        assert set(listed) == {"workspace:///docs/read%20me.md", "workspace:///img.bin", "workspace:///esc.txt"}
        assert listed["workspace:///img.bin"].size == 6
        templates = (await c.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["workspace:///{+path}"]
        r = await c.read_resource("workspace:///docs/read%20me.md")
        assert r.contents[0].text == "# hi\n"
        r = await c.read_resource("workspace:///img.bin")
        assert base64.b64decode(r.contents[0].blob) == b"\x89PNG\0\1"
        r = await c.read_resource("workspace:///esc.txt")  # control bytes: exact, but never as text
        assert base64.b64decode(r.contents[0].blob) == b"a\x1b[31mred\n"
        for uri, fragment in (
            ("workspace:///link", "symbolic link"),
            ("workspace:///nope", "does not exist"),
            ("workspace:///../etc/passwd", "'..'"),
            ("file:///etc/passwd", "unknown resource"),
        ):
            with pytest.raises(Exception) as e:
                await c.read_resource(uri)
            assert fragment in str(e.value), (uri, e.value)


async def test_file_writes_are_audited(serve, sandbox_base):
    async with serve(*FAST) as c:
        await ok(c, "write_file", path="a.txt", content="a")
        await ok(c, "delete_file", path="a.txt")
    lines = [json.loads(x) for x in (sandbox_base / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["tool"], e["path"]) for e in lines] == [
        ("write_file", "/workspace/a.txt"),
        ("delete_file", "/workspace/a.txt"),
    ]
