"""Turning captured bytes into text a model can read without harm.

Output goes into the model's context: it must be bounded (head + tail of
each stream, with an exact pointer to the rest) and inert (every piece goes
through gvisor_mcp.text.render_bytes, the one renderer).
"""

from __future__ import annotations

from ..text import render_bytes

MAX_PAGE = 256 * 1024
"""The most bytes one inspect_result call returns (its `length` maximum)."""


def marker(result_id: str, stream: str, start: int, left_out: int) -> str:
    """What stands for the bytes left out of an excerpt: the inspect_result call
    that reads them, exactly as it can be sent (its length is at most MAX_PAGE,
    so the call succeeds verbatim), and how to go on when one page is not all."""
    end = start + left_out
    first = min(left_out, MAX_PAGE)
    call = f'inspect_result(result_id="{result_id}", stream="{stream}", offset={start}, length={first})'
    if first == left_out:
        how = f"read them with {call}"
    else:
        how = (
            f"read them page by page: {call}, then the same call with offset=next_offset "
            f"(from its result) until next_offset reaches {end}"
        )
    return f"\n[... {left_out} bytes of {stream} not shown (offsets {start} to {end - 1}); {how} ...]\n"


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
        body = render_bytes(first + last)
    else:
        body = render_bytes(first) + marker(result_id, stream, len(first), stored - shown) + render_bytes(last)
    if written > stored:
        body += (
            f"\n[{stream}: the command wrote {written} bytes; the capture cap kept the first and "
            f"last {stored // 2} bytes; the {written - stored} bytes in between were not kept]"
        )
    return body
