"""What a result costs a client, and paging that works as written (issue 15, items 1-2).

The real server over stdio; the asserts are on the JSON the SDK's client receives.
"""

from __future__ import annotations

import json
import re

import pytest

from .conftest import run, structured, text

pytestmark = pytest.mark.runsc

MARKER_CALL = re.compile(r"inspect_result\(([^)]*)\)")
LINES = 250_000
"""`{i:07d}\\n` for i < LINES: 2,000,000 bytes of stdout, each line naming its offset."""
NUMBERED = f"python3 -c \"import sys; sys.stdout.write(''.join(f'{{i:07d}}\\n' for i in range({LINES})))\""


def expected_stdout() -> bytes:
    return "".join(f"{i:07d}\n" for i in range(LINES)).encode()


def marker_args(t: str) -> dict:
    """The arguments of the first inspect_result call written in a result's text, as sent."""
    m = MARKER_CALL.search(t)
    assert m, t
    args = {}
    for part in m.group(1).split(", "):
        key, _, value = part.partition("=")
        args[key] = json.loads(value)  # "res_..." and "stdout" are JSON strings; numbers are numbers
    return args


async def test_echo_hi_is_compact_and_its_text_unchanged(serve):
    async with serve() as c:
        r = await run(c, command="echo hi")
        s = structured(r)
        size = len(json.dumps(s))  # with spaces: more than the SDK sends
        assert size < 600, (size, s)
        # The text is what it was: one status line, then the output.
        assert re.fullmatch(
            r"status=exited exit_code=0 duration=\d+ms boot=\d+ms( \(warm\))? (peak_memory=\d+MiB )?"
            r"result_id=res_\w+\n--- stdout ---\nhi\n",
            text(r),
        ), text(r)
        # Nothing was requested: the receipt is the policy's hash alone.
        assert s["limits"] == {"policy_sha256": s["limits"]["policy_sha256"]}
        assert len(s["limits"]["policy_sha256"]) == 64

        # What the call asked for is shown, and how it was granted.
        s = structured(await run(c, command="true", memory_mb=128, timeout_seconds=20))
        assert {e["field"]: (e["requested"], e["granted"], e["rule"]) for e in s["limits"]["entries"]} == {
            "memory_mb": (128, 128, "requested"),
            "timeout_seconds": (20, 20, "requested"),
        }

        # The full receipt on request: every field, the tenant, the policy's source.
        full = await c.call_tool("inspect_result", {"result_id": s["result_id"], "receipt": True})
        f = structured(full)["limits"]
        assert f["tenant"] == "default" and f["policy_sha256"] == s["limits"]["policy_sha256"]
        fields = {e["field"] for e in f["entries"]}
        assert {"memory_mb", "timeout_seconds", "cpus", "image", "network", "user"} <= fields, fields
        assert "limits: memory_mb=128 (requested, requested 128" in text(full), text(full)
        assert "limits: network=none (default" in text(full), text(full)
        # Without it, a page carries no receipt.
        page = structured(await c.call_tool("inspect_result", {"result_id": s["result_id"]}))
        assert page["limits"] is None


async def test_the_marker_call_works_verbatim_and_pages_carry_only_the_page(serve):
    expected = expected_stdout()
    async with serve() as c:
        r = await run(c, command=NUMBERED)
        s, t = structured(r), text(r)
        assert s["stdout_bytes"] == len(expected) and s["stdout_truncated"]
        # The call written in the marker, sent exactly as written, succeeds ...
        args = marker_args(t)
        assert args["result_id"] == s["result_id"] and args["stream"] == "stdout"
        head, tail = s["stdout"].split("\n[...", 1)[0], s["stdout"].rsplit("...]\n", 1)[1]
        start, end = args["offset"], len(expected) - len(tail.encode())
        assert start == len(head.encode()) and end - start > args["length"]
        page = await c.call_tool("inspect_result", args)
        assert not page.is_error, text(page)
        p = structured(page)
        assert p["data_bytes"] == args["length"] and p["next_offset"] == start + args["length"]
        assert p["data"].encode() == expected[start : start + args["length"]]
        # ... and the marker says how to go on: from next_offset, up to where the tail begins.
        assert "offset=next_offset" in t
        assert int(re.search(r"until next_offset reaches (\d+)", t).group(1)) == end
        got = bytearray(p["data"].encode())
        while p["next_offset"] is not None and p["next_offset"] < end:
            p = structured(await c.call_tool("inspect_result", {**args, "offset": p["next_offset"]}))
            got += p["data"].encode()
        assert bytes(got[: end - start]) == expected[start:end]

        # A page is the page and a short status, not the head/tail excerpt again.
        small = await c.call_tool("inspect_result", {"result_id": s["result_id"], "offset": 1000, "length": 200})
        ps, pt = structured(small), text(small)
        assert ps["data"].encode() == expected[1000:1200]
        assert "stdout" not in ps and "stderr" not in ps
        assert len(pt) < 200 + 300, pt
        assert len(json.dumps(ps, separators=(",", ":"))) < 200 + 500, ps
        assert pt.startswith("status=exited exit_code=0 ") and pt.endswith(ps["data"])
        assert "--- stdout bytes 1000 to 1200 of 2000000; next page: offset=1200 ---" in pt


async def test_a_short_middle_gives_one_call_that_reads_it_all(serve):
    """Left out no more than one page: the call reads all of it, no paging asked."""
    async with serve() as c:
        r = await run(c, command="python3 -c \"print('x' * 20000)\"")
        t = text(r)
        args = marker_args(t)
        assert "next_offset" not in t.split("[...", 1)[1].split("]", 1)[0]
        p = structured(await c.call_tool("inspect_result", args))
        shown = structured(r)["stdout"]
        assert p["data"] == "x" * args["length"]
        assert args["offset"] + args["length"] + len(shown.rsplit("...]\n", 1)[1]) == 20001
