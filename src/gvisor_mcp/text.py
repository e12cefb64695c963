"""The one renderer for text that reaches a client, and the cap on stored command text.

Whatever a sandboxed command prints, whatever an agent sends (a command, a
workdir, a result id), may come back in a tool result, a page of output, a
progress message, a listing or an error. A client shows that text to a
person (a terminal, an IDE) and to a model. So every such text goes through
`render()`, which makes it *inert* and *visible*:

- C0 and C1 control characters (ESC, and with it every CSI/OSC sequence:
  colours, window titles, OSC 8 hyperlinks, cursor moves), DEL and CR;
- bidirectional controls (U+202A-202E, U+2066-2069, U+200E/F, U+061C): they
  reorder what a reader sees ("Trojan Source");
- zero-width and other invisible format characters (U+200B-200D, U+2060-2064,
  U+FEFF, soft hyphen, Unicode tags U+E0000-E007F, variation selectors,
  Hangul fillers): they hide text from a person that a model still reads;
- lone surrogates and the line/paragraph separators U+2028/2029;

are written as readable escapes: `\\x1b` below U+0100, `\\u202e` in the
BMP, `\\U000e0041` above. Newline and tab are kept. Everything else,
including backslashes and any other non-ASCII text, passes unchanged; so the
rendering is not reversible (a literal `\\x1b` printed by a command looks
like an escaped ESC): for exact bytes, inspect_result has encoding="base64".

`render()` is idempotent (its output contains nothing it would escape), so a
text may safely pass through it more than once: pieces are rendered where
they are made and the whole result again at the MCP boundary
(tools/boundary.py).

Pure: no MCP, no I/O; any module may use it.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

# Code points escaped besides C0/C1: every Cf (format), Cs (surrogate), Zl/Zp
# (line/paragraph separator) of Unicode 14 (Python 3.11's unicodedata), plus
# invisible marks and fillers outside those categories (U+034F, U+115F-1160,
# U+17B4-17B5, U+180B-180F, U+3164, U+FE00-FE0F, U+FFA0, U+E0100-E01EF).
# tests/unit/test_text.py checks this class against unicodedata.
_ESCAPED = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f"
    "\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f"
    "\u3164\ud800-\udfff\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\U000e0100-\U000e01ef"
)
_UNSAFE = re.compile(f"[{_ESCAPED}]")


def _escape(m: re.Match[str]) -> str:
    cp = ord(m.group())
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


_LATIN1 = {cp: _escape(m) for cp in range(0x100) if (m := _UNSAFE.match(chr(cp)))}
"""The unsafe code points below U+0100 and their escapes, for str.translate:
a flood of NULs (`head -c N /dev/zero`) is all escapes, and one Python call
per character in re.sub cost ~7 ms per 8 KiB excerpt, translate ~1 ms."""


def render(text: str) -> str:
    """`text` with every control, bidi, invisible or unpaired character escaped.

    Every string a client receives goes through here, some several times
    (a 4 KiB read_file page: ~16 calls). Two shortcuts, same result: ASCII
    text needs translate alone (every unsafe ASCII character is in _LATIN1,
    and its escapes are safe ASCII): 10 us per 4 KiB instead of 170; other
    text with nothing to escape is returned after one search (150 us
    instead of 650: translate leaves ASCII's fast path)."""
    if text.isascii():
        return text.translate(_LATIN1)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text.translate(_LATIN1))


def render_value(value: Any) -> Any:
    """A JSON-like value with every string (keys included) rendered."""
    if isinstance(value, str):
        return render(value)
    if isinstance(value, dict):
        return {render(k) if isinstance(k, str) else k: render_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_value(v) for v in value]
    return value


def render_bytes(data: bytes) -> str:
    """Bytes as text to read: UTF-8 where valid, each invalid byte as `\\xNN`,
    then `render()` (a character split by a page edge also shows as `\\xNN`)."""
    return render(data.decode("utf-8", errors="backslashreplace"))


def is_safe(text: str) -> bool:
    """True when `render(text) == text`."""
    return _UNSAFE.search(text) is None


# --- command text -------------------------------------------------------------

COMMAND_KEPT_BYTES = 4096
"""How much of a command is kept where it is stored or shown (result store,
audit log, list_active, logs). Past it, a marker with the whole command's
size and SHA-256: enough to recognise a command, never a multi-MiB copy of it."""


def command_sha256(command: str) -> str:
    return hashlib.sha256(command.encode("utf-8", "surrogatepass")).hexdigest()


def clip_command(command: str, keep: int = COMMAND_KEPT_BYTES) -> str:
    """`command` itself when it is at most `keep` UTF-8 bytes; else its first
    `keep` bytes (cut on a character boundary) and a marker naming its size
    and SHA-256, e.g. `... [command cut: 1048576 bytes in all, sha256 ab12...]`.

    Not rendered: what is stored keeps the command's own characters (cut
    short); what is shown goes through render() like any text."""
    raw = command.encode("utf-8", "surrogatepass")
    if len(raw) <= keep:
        return command
    head = raw[:keep].decode("utf-8", "ignore")  # a split character is dropped
    return f"{head} ... [command cut: {len(raw)} bytes in all, sha256 {command_sha256(command)}]"


__all__ = ["COMMAND_KEPT_BYTES", "clip_command", "command_sha256", "is_safe", "render", "render_bytes"]
