"""Structured logging: one structlog pipeline for the worker's own logs and for stdlib loggers
(aiokafka, redis, asyncio), rendered as one JSON object per line (``json``) or for humans
(``console``).

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``service`` and
``event``, plus whatever was bound with :func:`structlog.contextvars.bind_contextvars`
(e.g. ``symbol``, ``partition``) or passed as keyword arguments.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["SERVICE_NAME", "configure_logging", "get_logger"]

SERVICE_NAME = "signal-worker"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Marks the handler this module installs so a second configure_logging() replaces it.
_HANDLER_NAME = "signal-worker"


def _add_service(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Name the service on every line, so mixed log streams can be filtered by it."""
    event_dict.setdefault("service", SERVICE_NAME)
    return event_dict


def _shared_processors() -> list[Processor]:
    """Processors run for structlog and stdlib records alike, before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_service,
    ]


def _render_processors(fmt: Literal["json", "console"]) -> list[Processor]:
    """Exception formatting and the renderer; the last step of every record."""
    if fmt == "json":
        return [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(),
        ]
    # ConsoleRenderer pretty-prints exc_info itself.
    return [structlog.dev.ConsoleRenderer(colors=False)]


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}") from None


def configure_logging(fmt: Literal["json", "console"], level: str, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one renderer writing to ``stream`` (stdout).

    Safe to call more than once (tests, CLI sub-commands): the previous handler is replaced.
    """
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; use 'json' or 'console'")
    numeric = _parse_level(level)
    shared = _shared_processors()

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_render_processors(fmt)],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers may be used before this runs (imports, tests that reconfigure);
        # not caching keeps every logger on the current configuration.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger named ``name`` (conventionally ``__name__``) bound to the configured pipeline."""
    return cast(structlog.stdlib.BoundLogger, structlog.stdlib.get_logger(name))
