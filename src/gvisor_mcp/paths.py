"""Where the server keeps its state by default (a light module: the CLI's
`image` and `policy` commands need it without importing the MCP server)."""

from __future__ import annotations

from pathlib import Path

import platformdirs


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("gvisor-mcp"))
