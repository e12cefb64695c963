"""The bound on a request's `_meta.progressToken`, the same over stdio and HTTP.

Why: the token is echoed in every progress notification of the call, so an
unbounded one multiplies into the output (issue 14). Both transports refuse
a bad one before the SDK sees the request, with JSON-RPC -32602.
"""

from __future__ import annotations

from typing import Any

MAX_PROGRESS_TOKEN = 256
"""Characters of a progressToken: it is echoed in every progress notification."""


def progress_token_problem(params: Any) -> str | None:
    """Why a request's progressToken is refused, or None."""
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if not isinstance(meta, dict) or "progressToken" not in meta:
        return None
    token = meta["progressToken"]
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        return "invalid params: _meta.progressToken must be a string or an integer; send it again as one"
    if isinstance(token, int) and abs(token) > 2**53:
        return "invalid params: _meta.progressToken is an integer beyond 2^53; send a smaller one"
    if isinstance(token, str) and len(token) > MAX_PROGRESS_TOKEN:
        return (
            f"invalid params: _meta.progressToken is {len(token)} characters long; at most "
            f"{MAX_PROGRESS_TOKEN} are accepted, because it is sent back with every progress "
            "notification. Send the request again with a shorter token"
        )
    return None
