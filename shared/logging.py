"""structlog set-up: JSON lines in production, console-pretty on a TTY.

Every service calls `configure()` once at start; modules call `get_logger(__name__)` and bind
`request_id` / `worker_id` where they have them (`log.bind(request_id=...)`), or use
`bind_context(worker_id=...)` for process-wide fields.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure(level: str | None = None, json: bool | None = None, service: str | None = None) -> None:
    """Configure structlog and stdlib logging. A second call reconfigures (idempotent)."""
    global _configured
    level_name = (level or os.environ.get("EPD_LOG_LEVEL", "info")).upper()
    if json is None:
        fmt = os.environ.get("EPD_LOG_FORMAT", "auto")
        json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=getattr(logging, level_name, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if service:
        structlog.contextvars.bind_contextvars(service=service)
    _configured = True


def get_logger(name: str | None = None, **bound):
    if not _configured:
        configure()
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


def bind_context(**fields) -> None:
    """Bind fields (e.g. worker_id) to every log line of this process / task context."""
    structlog.contextvars.bind_contextvars(**fields)
