"""The installed package's version, as `--version` and `serverInfo.version` show it.

A leaf module (no imports from the package), so every room may use it.
"""

from __future__ import annotations

from importlib import metadata

PACKAGE = "gvisor-mcp"


def package_version() -> str:
    """From the installed distribution (pyproject.toml's version)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
