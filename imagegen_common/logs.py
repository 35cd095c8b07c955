"""Structured logging for both services: JSON lines in production, readable console lines in development."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]

# Libraries whose INFO lines repeat what our own lines and metrics already say, once per request (httpx logs
# every provider call). They speak at INFO only when the service runs at DEBUG.
_CHATTY_LIBRARIES = ("httpx", "httpcore")


def configure_logging(service: str, log_format: LogFormat, level: str) -> None:
    """Our lines and the libraries' stdlib lines go to stderr through one renderer, tagged with the service.

    Our own lines bypass stdlib logging: structlog's filtering logger makes a line below the level a no-op
    and renders the rest straight to stderr, about a third of the cost of a stdlib LogRecord, handler and
    formatter (measured: 18 vs 57 us per line), which matters at a dozen lines per job.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[structlog.typing.Processor] = [
        lambda _logger, _name, event: {**event, "service": service},
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
    ]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
            foreign_pre_chain=[*shared[:1], structlog.stdlib.add_log_level, *shared[2:]],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(numeric_level if numeric_level <= logging.DEBUG else logging.WARNING)
