"""The test database: a fresh, migrated database per test session on a real PostgreSQL server.

With DATABASE_URL set, the database is created on that server; otherwise on an embedded server
(pgserver) whose data lives in .data/test-postgres and which stops when the session ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from imagegen_common.embedded_postgres import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextmanager
def server_url() -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """A URL of the server's maintenance database, and the embedded server if one was started."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"], None
        return
    embedded = EmbeddedPostgres(ROOT / ".data" / "test-postgres")
    try:
        yield embedded.url(), embedded
    finally:
        embedded.stop()


async def create_database(admin_url: str) -> str:
    name = f"imagegen_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(admin_url, name)


async def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
