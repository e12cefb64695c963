"""What every `gvisor-mcp` command shares: the options before the command, one-line usage errors.

Options before the command (`gvisor-mcp --log-level ERROR serve ...`) are
read here, before the command's own parser runs, so they work for every
command, including `policy` and `image`, which parse their own arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from . import logs
from .errors import ConfigurationError

LOG_LEVEL_ENV = "GVISOR_MCP_LOG_LEVEL"


class UsageError(ConfigurationError):
    """A command line we cannot run; its text is the one line the user sees."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


@dataclass(frozen=True)
class Leading:
    """The options given before the command."""

    log_level: str | None = None
    show_version: bool = False


def split_leading(argv: list[str]) -> tuple[Leading, list[str]]:
    """`[--version] [--log-level L] COMMAND ...` -> (the options, COMMAND ...).

    `-h`/`--help` is left in place for the main parser to answer.
    """
    level: str | None = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if arg == "--version":
            return Leading(level, show_version=True), []
        if arg == "--log-level":
            if i + 1 >= len(argv):
                raise UsageError(f"gvisor-mcp: --log-level needs a value, one of {', '.join(logs.LEVELS)}")
            level, i = argv[i + 1], i + 2
        elif arg.startswith("--log-level="):
            level, i = arg.partition("=")[2], i + 1
        elif arg in ("-h", "--help"):
            break
        else:
            raise UsageError(
                f"gvisor-mcp: unknown option {arg!r} before the command; the options there are "
                "--version and --log-level LEVEL; see `gvisor-mcp --help`"
            )
    return Leading(level), argv[i:]


def choose_level(flag: str | None, command: str | None) -> str:
    """--log-level, else $GVISOR_MCP_LOG_LEVEL, else INFO for `serve` (an operator's log) and WARNING for the rest."""
    for where, text in (("--log-level", flag), (LOG_LEVEL_ENV, os.environ.get(LOG_LEVEL_ENV))):
        if text:
            try:
                return logs.parse_level(text)
            except ValueError as e:
                raise UsageError(f"gvisor-mcp: {where}: {e}") from None
    return "INFO" if command == "serve" else "WARNING"


def fail_usage(e: UsageError) -> int:
    print(str(e), file=sys.stderr)
    return 2
