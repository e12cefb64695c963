"""text.render: the one renderer for client-bound text, and the command-text cap.

Properties (hypothesis) over arbitrary strings and bytes, the exact escapes
for the sequences a terminal or a reader would act on, completeness against
the running Python's Unicode database, and the MCP boundary built on it
(tools/boundary.py).
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError

from gvisor_mcp import text as text_mod
from gvisor_mcp.text import COMMAND_KEPT_BYTES, clip_command, command_sha256, is_safe, render, render_bytes
from gvisor_mcp.tools.boundary import argument_error, render_call_result

UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
NAMED_INVISIBLES = [
    0x034F,
    0x115F,
    0x1160,
    0x17B4,
    0x17B5,
    0x3164,
    0xFFA0,
    *range(0x180B, 0x1810),
    *range(0xFE00, 0xFE10),
    *range(0xE0100, 0xE01F0),
]
ESCAPE = re.compile(r"\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8}")


def must_escape(ch: str) -> bool:
    if ch in "\n\t":
        return False
    return unicodedata.category(ch) in UNSAFE_CATEGORIES or ord(ch) in NAMED_INVISIBLES


# --- the escapes a reader or a terminal would act on ----------------------------------------


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),  # CSI colours
        ("\x1b]0;pwned title\x07", "\\x1b]0;pwned title\\x07"),  # OSC 0: window title
        (
            "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\",  # OSC 8: hyperlink
            "\\x1b]8;;https://evil.example\\x1b\\click\\x1b]8;;\\x1b\\",
        ),
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("a\rb", "a\\x0db"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("abc\u202edcb", "abc\\u202edcb"),  # RLO (Trojan Source)
        ("\u2066x\u2069\u200e\u200f\u061c", "\\u2066x\\u2069\\u200e\\u200f\\u061c"),
        ("pay\u200bpal\u200c\u200d\u2060\ufeff", "pay\\u200bpal\\u200c\\u200d\\u2060\\ufeff"),
        ("\U000e0041\U000e0042", "\\U000e0041\\U000e0042"),  # Unicode tags (ASCII smuggling)
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \udc80", "lone \\udc80"),
        ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
        ("caf\u00e9 \u4e2d\u6587 \U0001f600 \\x1b", "caf\u00e9 \u4e2d\u6587 \U0001f600 \\x1b"),  # text unchanged
    ],
)
def test_known_sequences(raw: str, shown: str) -> None:
    assert render(raw) == shown
    assert is_safe(shown)


@pytest.mark.slow
def test_every_unsafe_code_point_of_this_unicode_database_is_escaped() -> None:
    """The class in text.py is written out (no 0x110000-code-point scan at import);
    this checks it against unicodedata, so a new Python's Unicode update shows up here."""
    missed = [hex(cp) for cp in range(sys.maxunicode + 1) if must_escape(chr(cp)) and is_safe(chr(cp))]
    assert missed == []


@given(st.text())
def test_rendered_text_has_nothing_unsafe_and_only_well_formed_escapes(text: str) -> None:
    out = render(text)
    assert not any(must_escape(ch) for ch in out)
    assert is_safe(out)
    # Each unsafe character became exactly its own escape, in place.
    expected = "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        if must_escape(c)
        else c
        for c in text
    )
    assert out == expected


@given(st.text() | st.text(alphabet=st.characters(max_codepoint=0x7F)) | st.text(alphabet="ab\x00\x1b\x7f\u202e"))
def test_render_escapes_exactly_what_the_unsafe_class_matches(text: str) -> None:
    # render() takes the code points below U+0100 through a translate table,
    # ASCII text through that alone, and returns other text untouched when
    # the class matches nothing (speed); the result is the one escape per
    # match of the class, whichever way it went.
    assert render(text) == text_mod._UNSAFE.sub(text_mod._escape, text)


@given(st.text())
def test_render_is_idempotent(text: str) -> None:
    once = render(text)
    assert render(once) == once


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))))
def test_safe_text_passes_unchanged(text: str) -> None:
    text = "".join(c for c in text if ord(c) not in NAMED_INVISIBLES)
    assert render(text) == text


@given(st.binary())
def test_bytes_render_safely_and_valid_utf8_survives(data: bytes) -> None:
    out = render_bytes(data)
    assert is_safe(out)
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert out == render(decoded)


def test_invalid_utf8_and_encoded_c1_show_as_hex() -> None:
    assert render_bytes(b"ok \xff\xfe \xc2\x9b[2J \xe2\x80\xae") == "ok \\xff\\xfe \\x9b[2J \\u202e"


# --- the command-text cap ----------------------------------------------------------------------


def test_short_commands_are_kept_whole() -> None:
    for cmd in ("", "echo hi", "x" * COMMAND_KEPT_BYTES):
        assert clip_command(cmd) == cmd


def test_a_long_command_keeps_its_head_size_and_sha256() -> None:
    cmd = "y" * (1 << 20)
    out = clip_command(cmd)
    assert out.startswith("y" * COMMAND_KEPT_BYTES + " ... [command cut: 1048576 bytes in all, sha256 ")
    assert hashlib.sha256(cmd.encode()).hexdigest() in out
    assert len(out.encode()) < COMMAND_KEPT_BYTES + 150


@pytest.mark.slow
@settings(max_examples=200)
@given(st.text(min_size=1), st.integers(1, 64))
def test_the_cut_never_splits_a_character_and_stays_bounded(text: str, keep: int) -> None:
    out = clip_command(text, keep)
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= keep:
        assert out == text
        return
    head = out.split(" ... [command cut: ")[0]
    assert raw.startswith(head.encode("utf-8", "surrogatepass"))
    assert len(head.encode("utf-8", "surrogatepass")) <= keep
    assert out.endswith(f"{len(raw)} bytes in all, sha256 {command_sha256(text)}]")


# --- the MCP boundary ----------------------------------------------------------------------------


def test_a_call_result_is_rendered_in_text_and_structured_content() -> None:
    nasty = "\x1b]0;t\x07\u202e\u200b"
    result = CallToolResult(
        content=[TextContent(type="text", text=f"out {nasty}")],
        structured_content={"stdout": nasty, "limits": {"notes": [nasty], "n": 1}, "k\x1b": None},
    )
    out = render_call_result(result)
    assert out.content[0].text == "out \\x1b]0;t\\x07\\u202e\\u200b"
    assert out.structured_content == {
        "stdout": "\\x1b]0;t\\x07\\u202e\\u200b",
        "limits": {"notes": ["\\x1b]0;t\\x07\\u202e\\u200b"], "n": 1},
        "k\\x1b": None,
    }


def test_argument_errors_name_the_argument_the_value_and_what_is_allowed() -> None:
    class Args(BaseModel):
        model_config = ConfigDict(strict=True)
        background: bool = False
        memory_mb: int | None = None

    with pytest.raises(ValidationError) as e:
        Args.model_validate({"background": "yes", "memory_mb": "512"})
    text = argument_error("execute_command", e.value)
    assert text.startswith("Invalid arguments for execute_command: ")
    assert "background='yes' is not accepted: expected a JSON boolean: true or false." in text
    assert "memory_mb='512'" in text and "Ask again" in text


def test_tools_send_progress_only_through_the_renderer() -> None:
    """ctx.report_progress straight from a tool would skip render(): only boundary.py may call it."""
    tools = Path(__file__).resolve().parents[2] / "src" / "gvisor_mcp"
    direct = [
        str(p.relative_to(tools))
        for p in tools.rglob("*.py")
        if "ctx.report_progress(" in p.read_text() and p.name != "boundary.py"
    ]
    assert direct == []
