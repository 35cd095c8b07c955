"""Everything a service logs while a block runs: our structlog lines and the libraries' stdlib records (grpc's)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog


@dataclass
class CapturedLogs:
    lines: list[MutableMapping[str, Any]] = field(default_factory=list)  # structlog event dicts, with context
    records: list[logging.LogRecord] = field(default_factory=list)

    def size(self) -> int:
        """About how many characters the lines would take in the log."""
        return sum(len(repr(line)) for line in self.lines) + sum(len(r.getMessage()) for r in self.records)

    def tracebacks(self) -> list[str]:
        found = [str(line.get("event")) for line in self.lines if line.get("exc_info") or line.get("exception")]
        found += [r.getMessage() for r in self.records if r.exc_info or "Traceback" in r.getMessage()]
        return found


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record)


@contextmanager
def captured_logs() -> Iterator[CapturedLogs]:
    captured = CapturedLogs()
    handler = _Keep(captured.records)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as lines:
            captured.lines = lines
            yield captured
    finally:
        root.removeHandler(handler)
