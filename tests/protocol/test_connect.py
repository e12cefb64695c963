"""`gvisor-mcp connect`: a desktop user who is not root (issue 15, item 7).

The chain a user's client really runs: the SDK's stdio client -> `gvisor-mcp
connect` running as uid 65534 (`nobody`, no capabilities, via setpriv) ->
the real HTTP server running as root -> real runsc. Plus the two ways it
fails that a user meets: the token is refused, the server is down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from ..conftest import leftovers
from .conftest import BIN, structured, text
from .test_http import _free_port, running_http_server

pytestmark = pytest.mark.runsc

NOBODY = 65534
SETPRIV = ["--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--inh-caps=-all"]


@pytest.fixture
def user_dir():
    """A directory only `nobody` can read, like a user's home: it holds the user's token file."""
    d = Path(tempfile.mkdtemp(prefix="gvisor-mcp-connect-", dir="/tmp"))
    os.chown(d, NOBODY, NOBODY)
    d.chmod(0o700)
    probe = subprocess.run(["setpriv", *SETPRIV, str(BIN), "--version"], capture_output=True, text=True)
    if probe.returncode != 0:  # e.g. a checkout under /root (mode 700)
        shutil.rmtree(d)
        pytest.skip(f"uid {NOBODY} cannot run {BIN}: {probe.stderr.strip()[:200]}; clone outside /root")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def token_file(d: Path, token: str, name: str = "token") -> Path:
    f = d / name
    f.write_text(token + "\n")
    os.chown(f, NOBODY, NOBODY)
    f.chmod(0o600)
    return f


def as_nobody(url: str, tokens: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command="setpriv",
        args=[*SETPRIV, str(BIN), "connect", url, "--token-file", str(tokens), *extra],
        env={"PATH": os.environ["PATH"], "HOME": str(tokens.parent)},
    )


def bridge_uids(tokens: Path) -> set[int]:
    """The real uids of the running `connect` processes that use `tokens`."""
    uids = set()
    for proc in Path("/proc").iterdir():
        try:
            if str(tokens).encode() in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                uids.add(int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1]))
        except (OSError, StopIteration, ValueError):
            continue
    return uids


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_non_root_client_runs_commands_through_the_root_http_server(sandbox_base, tmp_path, user_dir, mode):
    with running_http_server(sandbox_base, tmp_path) as server:
        tokens = token_file(user_dir, server.tokens["alice"])
        progress: list[tuple[float, float | None, str | None]] = []

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append((p, total, message))

        async with Client(as_nobody(server.url, tokens), mode=mode) as c:
            assert bridge_uids(tokens) == {NOBODY}  # the bridge runs as the user, not root
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"execute_command", "inspect_result", "list_active", "cancel_command"} <= names

            # Protocol 2026-07-28 has no session, so no workspace until the agent makes one
            # (test_http_workspaces); through the bridge exactly as directly.
            where: dict[str, str] = {}
            if mode == "auto":
                where["workspace"] = structured(await c.call_tool("create_workspace", {}))["workspace"]

            # A real command in gVisor, as the policy's user; progress passes through.
            r = await c.call_tool(
                "execute_command",
                {
                    "command": "for i in 1 2 3; do echo tick $i; sleep 1; done; id -u; touch /workspace/made-here",
                    **where,
                },
                progress_callback=on_progress,
            )
            s = structured(r)
            assert not r.is_error and s["exit_code"] == 0 and s["status"] == "exited", s
            assert "tick 3\n1000\n" in text(r)
            assert progress and any("tick" in (m or "") for _, _, m in progress), progress

            # Resources: the workspace file the command made is listed.
            if mode == "auto":  # an agent-made workspace is read by its id (workspace://ID/path)
                got = await c.read_resource(f"workspace://{where['workspace']}/made-here")
                assert got.contents, got
            else:
                listed = [res.uri for res in (await c.list_resources()).resources]
                assert any(uri.endswith("/made-here") for uri in listed), listed

            # Cancellation passes through too: the server kills the container.
            container = None
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def call() -> None:
                    with scope:
                        await c.call_tool("execute_command", {"command": "sleep 60"})

                tg.start_soon(call)
                with anyio.fail_after(60):
                    while container is None:
                        active = structured(await c.call_tool("list_active", {}))["commands"]
                        container = active[0]["container_id"] if active else None
                        await anyio.sleep(0.1)
                    while container not in leftovers(sandbox_base).get("runsc list", []):
                        await anyio.sleep(0.1)
                scope.cancel()
            with anyio.fail_after(60):
                while container in leftovers(sandbox_base).get("runsc list", []):
                    await anyio.sleep(0.1)
            assert structured(await c.call_tool("list_active", {}))["commands"] == []
        assert bridge_uids(tokens) == set()  # the client closed stdin: the bridge is gone


async def test_a_refused_token_and_a_server_that_is_down_get_a_clear_error(sandbox_base, tmp_path, user_dir):
    with running_http_server(sandbox_base, tmp_path) as server:
        wrong = token_file(user_dir, "not-a-token-the-server-knows", "wrong")
        with pytest.raises(BaseException) as caught:
            async with Client(as_nobody(server.url, wrong), mode="legacy"):
                pass
        message = _mcp_error(caught.value)
        assert message.startswith(
            f"gvisor-mcp connect: the server at {server.url} refused the token in {wrong} "
            "(HTTP 401: this bearer token is not valid here"
        ), message
        assert "gvisor-mcp token add TENANT" in message

        metrics = token_file(user_dir, server.tokens["metrics"], "metrics")  # a token, but not a tenant's
        with pytest.raises(BaseException) as caught:
            async with Client(as_nobody(server.url, metrics), mode="legacy"):
                pass
        assert "does not let the token in" in _mcp_error(caught.value)
        assert "a metrics token cannot call tools" in _mcp_error(caught.value)

    down = f"http://127.0.0.1:{_free_port()}/mcp"  # nothing listens there
    good = token_file(user_dir, "some-token", "good")
    for mode in ("legacy", "auto"):
        with pytest.raises(BaseException) as caught:
            with anyio.fail_after(60):
                async with Client(as_nobody(down, good), mode=mode):
                    pass
        message = _mcp_error(caught.value)
        assert message.startswith(f"gvisor-mcp connect: cannot reach the gvisor-mcp server at {down} ("), message
        assert "Is it running?" in message and "systemctl status gvisor-mcp" in message


async def test_an_https_server_with_a_private_ca_is_reached_with_its_ca_file(sandbox_base, tmp_path, user_dir):
    """The server's own --tls-cert signed by a CA this machine does not trust: without --ca-file the
    user is told to give it; with it, commands run over TLS; a wrong file is one line at start."""
    from ..internet import make_ca

    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = make_ca(certs, "localhost", "127.0.0.1")
    user_ca = user_dir / "ca.pem"
    shutil.copy(ca, user_ca)
    os.chown(user_ca, NOBODY, NOBODY)
    with running_http_server(sandbox_base, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        url = server.url.replace("http://", "https://")
        tokens = token_file(user_dir, server.tokens["alice"])
        async with Client(as_nobody(url, tokens, "--ca-file", str(user_ca)), mode="legacy") as c:
            r = await c.call_tool("execute_command", {"command": "echo over-tls"})
            assert structured(r)["stdout"] == "over-tls\n", structured(r)

        with pytest.raises(BaseException) as caught:
            with anyio.fail_after(60):
                async with Client(as_nobody(url, tokens), mode="legacy"):
                    pass
        message = _mcp_error(caught.value)
        assert message.startswith(
            f"gvisor-mcp connect: the server at {url} sent a certificate this machine does not trust ("
        ), message
        assert "CERTIFICATE_VERIFY_FAILED" in message and "--ca-file FILE" in message

    not_pem = token_file(user_dir, "not a certificate", "not-pem")
    for argv, expected in (
        ([url, "--ca-file", str(not_pem)], f"gvisor-mcp connect: the CA file '{not_pem}' holds no PEM certificate ("),
        ([url, "--ca-file", str(user_dir / "nope.pem")], f"gvisor-mcp connect: cannot read the CA file '{user_dir}"),
        ([server.url, "--ca-file", str(user_ca)], "gvisor-mcp connect: --ca-file is for https:// URLs;"),
    ):
        r = subprocess.run(
            ["setpriv", *SETPRIV, str(BIN), "connect", *argv, "--token-file", str(tokens)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        assert r.returncode == 2 and r.stderr.startswith(expected) and r.stderr.count("\n") == 1, r.stderr


async def test_a_server_restart_is_reported_as_a_lost_session(sandbox_base, tmp_path, user_dir):
    port = _free_port()
    async with contextlib.AsyncExitStack() as stack:
        first = stack.enter_context(running_http_server(sandbox_base, tmp_path, port=port))
        tokens = token_file(user_dir, first.tokens["alice"])
        c = await stack.enter_async_context(Client(as_nobody(first.url, tokens), mode="legacy"))
        assert structured(await c.call_tool("list_active", {}))["commands"] == []
        stack.pop_all()  # keep the client; stop only the server
        with running_http_server(sandbox_base, tmp_path, port=port):  # a new server, same port and token
            try:
                with pytest.raises(MCPError) as caught:
                    await c.call_tool("list_active", {})
                assert caught.value.error.code == -32002
                assert caught.value.error.message.startswith(
                    f"gvisor-mcp connect: the server at {first.url} no longer knows this session (it restarted"
                ), caught.value.error.message
            finally:
                await c.__aexit__(None, None, None)


def test_bad_connect_arguments_get_one_line(user_dir):
    def connect(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["setpriv", *SETPRIV, str(BIN), "connect", *argv],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    r = connect("http://127.0.0.1:1/mcp", "--token-file", str(user_dir / "missing"))
    assert r.returncode == 2 and r.stderr == (
        f"gvisor-mcp connect: cannot read the token file '{user_dir / 'missing'}': No such file or directory; give "
        "the file that holds the token `gvisor-mcp token add TENANT` printed (readable by you, e.g. chmod 600)\n"
    )
    root_only = user_dir / "root-only"
    root_only.write_text("t\n")
    root_only.chmod(0o600)  # owned by root: the user cannot read it
    r = connect("http://127.0.0.1:1/mcp", "--token-file", str(root_only))
    assert r.returncode == 2 and "Permission denied" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = connect("http://gvisor.example/mcp", "--token-file", str(token_file(user_dir, "t")))
    assert r.returncode == 2 and r.stderr == (
        "gvisor-mcp connect: URL 'http://gvisor.example/mcp' sends the token unencrypted to another machine; "
        "use https:// (the server's --tls-cert, or a TLS proxy) or a loopback address\n"
    )
    two = user_dir / "two"
    two.write_text("a\nb\n")
    r = connect("http://127.0.0.1:1/mcp", "--token-file", str(two))
    assert r.returncode == 2 and "must hold exactly one token on one line (found 2" in r.stderr
    r = connect("http://127.0.0.1:1/mcp")
    assert r.returncode == 2 and r.stderr == (
        "gvisor-mcp connect: the following arguments are required: --token-file; see `gvisor-mcp connect --help`\n"
    )


def _mcp_error(e: BaseException) -> str:
    """The MCPError inside what the SDK client raised (it may come wrapped in exception groups)."""
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    assert isinstance(e, MCPError), repr(e)
    return str(e.error.message)
