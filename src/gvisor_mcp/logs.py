"""Structured logs to stderr, always: on stdio, stdout is the MCP channel."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_configured: str | None = None
"""The level the process was configured with; None until configure() runs."""


def parse_level(text: str) -> str:
    """`--log-level` / GVISOR_MCP_LOG_LEVEL, case-insensitive; a clear error otherwise."""
    level = text.strip().upper()
    if level not in LEVELS:
        raise ValueError(f"log level {text!r} is not one of {', '.join(LEVELS)} (case does not matter)")
    return level


def configure(level: str = "INFO", json: bool = True) -> None:
    global _configured
    level = parse_level(level)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s", force=True)
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # log.exception(...) / exc_info=True: the traceback as an "exception"
            # string (no local variables: they may hold commands or tokens).
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = level


def ensure(default: str) -> None:
    """Configure with `default` unless the process already chose a level.

    The CLI configures once, from `--log-level`; code that may also run
    without the CLI (serve() called directly) calls this, so it never
    overrides the operator's choice (issue 15: `--log-level ERROR serve`
    logged INFO because serve configured logging a second time).
    """
    if _configured is None:
        configure(default)
