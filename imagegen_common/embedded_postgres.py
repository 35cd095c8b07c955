"""The embedded PostgreSQL used when no DATABASE_URL is set (pgserver: real PostgreSQL binaries from PyPI)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

# pgserver logs every step at INFO; only its warnings are worth a line in our logs.
logging.getLogger("pgserver").setLevel(logging.WARNING)


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir` and persists between runs.

    The server is shared by every process that opens the same folder; with `stop_on_exit` it stops
    when the last of them exits, otherwise it keeps running for the next one.
    """

    def __init__(self, data_dir: Path, *, stop_on_exit: bool = True) -> None:
        import pgserver.postgres_server  # imported here: it is heavy and only the embedded setup needs it

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server: Any = pgserver.postgres_server.get_server(
            data_dir.resolve(), cleanup_mode="stop" if stop_on_exit else None
        )

    def url(self, database: str = "postgres") -> str:
        """A libpq-style URL (unix socket) for `database`."""
        return str(self._server.get_uri(database))

    def stop(self) -> None:
        self._server.cleanup()
