"""Every text path to the client goes through text.render (issue 14, finding 6).

Before: the progress message carried the command's last output line raw
(CSI colours, an OSC 0 window title, an OSC 8 hyperlink), list_active echoed
command text raw, and bidi and zero-width characters passed everywhere.
Here each path is driven through the real server with the same hostile
text, and the client must receive it escaped: results (text and structured),
pages of inspect_result, progress messages, list_active, cancel_command,
and error texts that quote what the request sent. And arguments are strict:
`background: "yes"` is refused, with a message that says what to send.
"""

from __future__ import annotations

import json

import anyio
import pytest

from gvisor_mcp.text import is_safe

from .conftest import canary, run, running_container, structured, text

pytestmark = pytest.mark.runsc

# printf-able in /bin/sh: CSI red, OSC 0 title, OSC 8 link, C1 CSI, RLO, zero-width space,
# BOM, a Unicode tag character (ASCII smuggling) and a word joiner.
HOSTILE_PRINTF = (
    r"\033[31mRED\033[0m \033]0;PWNED-TITLE\007 \033]8;;https://evil.example\033\\LINK\033]8;;\033\\ "
    r"\302\233"
    r"2J \342\200\256RLO \342\200\213ZW \357\273\277BOM \363\240\201\201TAG \342\201\240WJ"
)
SHOWN = [
    "\\x1b[31mRED\\x1b[0m",
    "\\x1b]0;PWNED-TITLE\\x07",
    "\\x1b]8;;https://evil.example\\x1b\\LINK",
    "\\x9b2J",
    "\\u202eRLO",
    "\\u200bZW",
    "\\ufeffBOM",
    "\\U000e0041TAG",
    "\\u2060WJ",
]


def all_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *all_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in all_strings(v)]
    return []


def assert_inert(result) -> str:
    """Nothing unsafe anywhere in what the client got; its text."""
    for s in [c.text for c in result.content if c.type == "text"] + all_strings(result.structured_content or {}):
        assert is_safe(s), repr(s)
    return text(result)


async def test_results_pages_progress_and_cancel_are_rendered(serve):
    progress: list[str] = []

    async def on_progress(_p, _t, message):
        progress.append(message or "")

    async with serve("--pool-size", "0") as c:
        # A foreground call that prints the hostile line and keeps running: progress quotes it.
        r = await c.call_tool(
            "execute_command",
            {"command": f"printf '{HOSTILE_PRINTF}\\n'; printf '{HOSTILE_PRINTF}\\n' >&2; sleep 3"},
            progress_callback=on_progress,
        )
        shown = assert_inert(r)
        s = structured(r)
        for piece in SHOWN:
            assert piece in s["stdout"] and piece in s["stderr"] and piece in shown, piece
        assert progress, "no progress notification was sent"
        assert any("last line: " in m for m in progress), progress
        for m in progress:
            assert is_safe(m), repr(m)
        assert any(all(piece in m for piece in SHOWN) for m in progress), progress

        # inspect_result: the text page, and base64 still gives the exact bytes.
        page = await c.call_tool("inspect_result", {"result_id": s["result_id"]})
        page_text = assert_inert(page)
        assert all(piece in page_text for piece in SHOWN)
        raw = await c.call_tool("inspect_result", {"result_id": s["result_id"], "encoding": "base64"})
        import base64

        assert b"\x1b]0;PWNED-TITLE\x07" in base64.b64decode(structured(raw)["data"])

        # list_active and cancel_command: command text with the same characters.
        command = "sleep 300 # \x1b]0;T\x07 \u202eevil\u202c \u200b \U000e0041 \x9b"
        rb = await run(c, command=command, background=True)
        rid = structured(rb)["result_id"]
        await running_container(c, rid)
        listing = await c.call_tool("list_active", {})
        listed = assert_inert(listing)
        (entry,) = [e for e in structured(listing)["commands"] if e["result_id"] == rid]
        assert entry["command"] == ("sleep 300 # \\x1b]0;T\\x07 \\u202eevil\\u202c \\u200b \\U000e0041 \\x9b")
        assert "\\u202eevil" in listed
        cancelled = await c.call_tool("cancel_command", {"result_id": rid})
        assert structured(cancelled)["status"] == "killed"
        assert_inert(cancelled)
        await canary(c)


async def test_error_texts_quote_request_values_rendered(serve):
    async with serve("--pool-size", "0") as c:
        cases = [
            ("execute_command", {"command": "true", "workdir": "/nope/\x1b]0;T\x07\u202e/x/../.."}),
            ("execute_command", {"command": "true", "env": {"X\u202e": "\x1b[2J"}}),
            ("execute_command", {"command": "true", "image": "\x1b]8;;x\x1b\\\u200b"}),
            ("inspect_result", {"result_id": "res_\x1b[2J\u202e\U000e0041"}),
            ("cancel_command", {"result_id": "\x9b\u2066id"}),
            ("no_such_tool_\x1b[31m\u202e", {}),
        ]
        for tool, args in cases:
            r = await c.call_tool(tool, args)
            assert r.is_error, (tool, args)
            shown = assert_inert(r)
            assert "\\x1b" in shown or "\\x9b" in shown or "\\u202e" in shown, shown
        await canary(c)


@pytest.mark.parametrize(
    "args, named",
    [
        ({"background": "yes"}, "background='yes' is not accepted: expected a JSON boolean: true or false"),
        ({"background": "true"}, "background='true' is not accepted: expected a JSON boolean"),
        ({"background": 1}, "background=1 is not accepted: expected a JSON boolean"),
        (
            {"memory_mb": "512"},
            "memory_mb='512' is not accepted: expected a whole number (a JSON integer, not a string)",
        ),
        ({"memory_mb": 512.0}, "memory_mb=512.0 is not accepted"),
        ({"timeout_seconds": "10"}, "timeout_seconds='10' is not accepted: expected a number (not a string)"),
        ({"env": {"A": 1}}, "env.A=1 is not accepted: expected a string"),
    ],
)
async def test_arguments_are_strict_and_the_refusal_says_what_to_send(serve, sandbox_base, args, named):
    async with serve("--pool-size", "0") as c:
        r = await run(c, command="echo ran", **args)
        assert r.is_error, structured(r)
        msg = text(r)
        assert msg.startswith("Invalid arguments for execute_command: "), msg
        assert named in msg and "Ask again" in msg, msg
        # Refused before anything: no run; one refusal line in the audit log
        # (the one refusal path, issue 15 item 3: it used to be none).
        [entry] = [json.loads(x) for x in (sandbox_base / "state" / "audit.jsonl").read_text().splitlines()]
        assert entry["decision"] == "denied" and "result_id" not in entry and entry["reason"] == msg
        ok = await run(c, command="echo ran", background=False, memory_mb=256, timeout_seconds=10)
        assert structured(ok)["stdout"] == "ran\n"


async def test_results_name_the_policy_by_hash_and_file_name_never_its_path(serve, tmp_path):
    policy = tmp_path / "deep" / "secret-dir" / "team.yaml"
    policy.parent.mkdir(parents=True)
    policy.write_text("version: 1\n")
    async with serve("--policy", str(policy), "--pool-size", "0") as c:
        r = await run(c, command="true")
        s = structured(r)
        assert len(s["limits"]["policy_sha256"]) == 64
        assert str(tmp_path) not in json.dumps(s) and str(tmp_path) not in text(r)
        with anyio.fail_after(60):
            page = await c.call_tool("inspect_result", {"result_id": s["result_id"], "receipt": True})
        assert structured(page)["limits"]["policy_source"] == "team.yaml"
        assert str(tmp_path) not in json.dumps(structured(page)) and str(tmp_path) not in text(page)


async def test_file_tools_show_hostile_names_and_contents_rendered(serve):
    """Names and bytes a command wrote reach the client through the file tools
    (list_files, read_file, delete_file) rendered like command output."""
    async with serve("--pool-size", "0") as c:
        made = await run(
            c,
            command=f"cd /workspace && printf '{HOSTILE_PRINTF}\\n' > \"$(printf 'n\\033]0;T\\007\\342\\200\\256x')\"",
        )
        assert structured(made)["exit_code"] == 0, text(made)
        listing = await c.call_tool("list_files", {"path": "/workspace"})
        listed = assert_inert(listing)
        [entry] = [e for e in structured(listing)["entries"] if e["path"].startswith("/workspace/n")]
        assert entry["path"] == "/workspace/n\\x1b]0;T\\x07\\u202ex" and entry["path"] in listed
        # The content, read as text: every hostile piece escaped, in the text and the data.
        await run(c, command="cd /workspace && cp n* plain.txt")
        page = await c.call_tool("read_file", {"path": "plain.txt"})
        shown = assert_inert(page)
        assert structured(page)["escaped"]
        for piece in SHOWN:
            assert piece in structured(page)["data"] and piece in shown, piece
        deleted = await c.call_tool("delete_file", {"path": "plain.txt"})
        assert_inert(deleted)
