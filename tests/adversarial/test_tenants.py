"""Tenants: two stdio servers on one state directory, `--tenant a` and
`--tenant b`. A cannot read, inspect, list or cancel B's results, nor reach
B's workspace, and every answer about B's ids is the answer about an id that
never existed.
"""

from __future__ import annotations

import re
import secrets

import pytest

from .conftest import canary, ok, output_until, run, structured, text, write_policy

pytestmark = pytest.mark.runsc

POLICY = """version: 1
workspace: {scope: tenant, size: 16MiB}
tenants:
  a: {}
  b: {}
"""


def shape(message: str, result_id: str) -> str:
    """An error text with the id taken out: what remains must not depend on whose id it was."""
    return message.replace(result_id, "<ID>").replace(result_id[:80], "<ID>")


async def test_tenant_a_cannot_see_touch_or_reach_anything_of_tenant_b(serve, sandbox_base, tmp_path):
    policy = write_policy(tmp_path, POLICY)
    state = sandbox_base / "state"
    secret = f"secret-b-{secrets.token_hex(8)}"
    async with serve("--policy", str(policy), "--tenant", "b", "--pool-size", "0") as b:
        done = (await ok(b, f"echo {secret} > /workspace/{secret} && echo {secret}"))["result_id"]
        running = structured(await run(b, command=f"echo {secret}; sleep 300", background=True))["result_id"]
        await output_until(b, running, secret)
        async with serve("--policy", str(policy), "--tenant", "a", "--pool-size", "0") as a:
            for rid in (done, running):
                random_id = "res_" + secrets.token_hex(16)
                for tool, args in (
                    ("inspect_result", {}),
                    ("inspect_result", {"wait_seconds": 1, "stream": "stderr"}),
                    ("inspect_result", {"encoding": "base64", "offset": 0, "length": 16}),
                    ("cancel_command", {}),
                ):
                    real = await a.call_tool(tool, {"result_id": rid, **args})
                    fake = await a.call_tool(tool, {"result_id": random_id, **args})
                    assert real.is_error and fake.is_error, (tool, text(real), text(fake))
                    assert "not found" in text(real)
                    assert secret not in text(real)
                    assert shape(text(real), rid) == shape(text(fake), random_id), (tool, args)
            listing = structured(await a.call_tool("list_active", {}))
            assert listing["commands"] == []
            # B's workspace: not there, not by any path, not by its host path.
            host_b = state / "workspaces" / "b" / "shared"
            s = structured(
                await run(
                    a,
                    command=(
                        f"ls -A /workspace; cat /workspace/{secret} /workspace/../b/shared/{secret} {host_b}/{secret}; "
                        f"find / -path /proc -prune -o -path /usr -prune -o -name '{secret}*' -print"
                    ),
                )
            )
            assert secret not in s["stdout"], s
            r = await run(a, command="pwd", workdir=str(host_b))
            assert r.is_error or structured(r)["status"] == "error"
            await ok(a, "echo mine > /workspace/a-file")
            await canary(a)
        # B's command survived A's cancel attempts; B's own view is intact.
        listing = structured(await b.call_tool("list_active", {}))
        assert [x["result_id"] for x in listing["commands"]] == [running]
        assert structured(await b.call_tool("inspect_result", {"result_id": done}))["data"] == secret + "\n"
        s = await ok(b, "ls -A /workspace")
        assert s["stdout"] == f"{secret}\n"  # and A's file is not in B's workspace
        assert structured(await b.call_tool("cancel_command", {"result_id": running}))["status"] == "killed"
        await canary(b)
    # Separate images on the host, kept (scope tenant) and unmounted (the fixture checks mounts).
    images = state / "workspaces" / ".images"
    assert (images / "a" / "shared.img").is_file() and (images / "b" / "shared.img").is_file()


async def test_not_found_answers_do_not_depend_on_the_id_shape(serve, sandbox_base, tmp_path):
    """Ids that could make a lookup behave differently (path-like, SQL-like,
    huge, near-misses of a real id) all get the same answer, and none leaks."""
    policy = write_policy(tmp_path, POLICY)
    async with serve("--policy", str(policy), "--tenant", "b", "--pool-size", "0") as b:
        real = (await ok(b, "echo x"))["result_id"]
    async with serve("--policy", str(policy), "--tenant", "a", "--pool-size", "0") as a:
        shapes = set()
        for rid in (
            real,
            real.upper(),
            real + " ",
            real[:-1],
            "res_" + "0" * 32,
            "../b/" + real,
            "' OR 1=1 --",
            "%",
            "*",
            "res_%",
            "\\x00",
            "a" * 10_000,
        ):
            r = await a.call_tool("inspect_result", {"result_id": rid})
            assert r.is_error, rid
            shapes.add(re.sub(r"result_id (['\"]).*\1 not found", "result_id <ID> not found", text(r), flags=re.S))
        assert len(shapes) == 1, shapes
        await canary(a)
