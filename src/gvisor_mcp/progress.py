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
