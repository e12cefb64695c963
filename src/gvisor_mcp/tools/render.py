"""Turning captured bytes into text a model can read without harm.

Output goes into the model's context: it must be bounded (head + tail of
each stream, with an exact pointer to the rest) and inert (no terminal
escape sequences, no invalid UTF-8 passed through as mojibake).
"""

from __future__ import annotations

from ..text import render_bytes

safe_text = render_bytes
"""Captured bytes as inert text: gvisor_mcp.text.render_bytes (the one renderer)."""


def excerpt(
    first: bytes,
    last: bytes,
    stored: int,
    *,
    result_id: str,
    stream: str,
    written: int,
) -> str:
    """The text for a stored stream of `stored` bytes of which `first` (its
    head) and `last` (its tail) were read; `first` alone when it is all of it.

    The marker gives the exact inspect_result call for the bytes in between;
    `written` (all bytes the command wrote) above `stored` means the capture
    cap dropped a middle part, which is said too.
    """
    shown = len(first) + len(last)
    if shown >= stored:
        body = safe_text(first + last)
    else:
        left_out = stored - shown
        start = len(first)
        body = (
            safe_text(first)
            + f"\n[... {left_out} bytes of {stream} not shown (offsets {start} to {start + left_out - 1}); "
            f'read them with inspect_result(result_id="{result_id}", stream="{stream}", '
            f"offset={start}, length={left_out}) ...]\n"
            + safe_text(last)
        )
    if written > stored:
        body += (
            f"\n[{stream}: the command wrote {written} bytes; the capture cap kept the first and "
            f"last {stored // 2} bytes; the {written - stored} bytes in between were not kept]"
        )
    return body
