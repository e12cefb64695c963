"""Turning captured bytes into text a model can read without harm.

Output goes into the model's context: it must be bounded (head + tail of
each stream, with an exact pointer to the rest) and inert (no terminal
escape sequences, no invalid UTF-8 passed through as mojibake).
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(data: bytes) -> str:
    """UTF-8 where valid; invalid bytes as \\xNN; control characters (ESC
    included, so no terminal escape sequence survives) as \\xNN; newline and
    tab kept."""
    text = data.decode("utf-8", errors="backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def excerpt(
    data: bytes,
    *,
    result_id: str,
    stream: str,
    head: int,
    tail: int,
    written: int,
) -> str:
    """Head and tail of a stored stream, with a marker saying what was left out.

    `data` is the stored stream (what inspect_result pages); `written` is how
    many bytes the command wrote in all (more than stored when capture
    truncated it).
    """
    stored = len(data)
    notes = []
    if stored <= head + tail:
        body = safe_text(data)
    else:
        # Cut on byte offsets the model can reuse verbatim with inspect_result.
        left_out = stored - head - tail
        body = (
            safe_text(data[:head])
            + f"\n[... {left_out} bytes of {stream} not shown (bytes {head} to {head + left_out - 1}); "
            f'read them with inspect_result(result_id="{result_id}", stream="{stream}", '
            f"offset={head}, length={left_out}) ...]\n"
            + safe_text(data[stored - tail :])
        )
    if written > stored:
        notes.append(
            f"[{stream}: the command wrote {written} bytes; the capture cap kept the first and "
            f"last {stored // 2} bytes ({stored} in all); the middle {written - stored} bytes are gone]"
        )
    return body + ("\n" + "\n".join(notes) if notes else "")
