"""Session-wide fixtures: a real PostgreSQL database, migrated once per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from imagegen_common.migrate import migrate
from tests.support.database import create_database, drop_database, server_url


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with server_url() as (url, _embedded):
        yield url


@pytest.fixture(scope="session")
async def database_url(pg_server: str) -> AsyncIterator[str]:
    url = await create_database(pg_server)
    await migrate(url)
    yield url
    await drop_database(pg_server, url)


@pytest.fixture
async def private_database_url(pg_server: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test, when jobs left by other tests would disturb what it counts."""
    url = await create_database(pg_server)
    await migrate(url)
    yield url
    await drop_database(pg_server, url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions straight against the tables."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()
