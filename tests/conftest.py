"""Session-wide fixtures: a real PostgreSQL database, migrated once per test session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


_ROOT = Path(__file__).resolve().parent.parent
_OUR_CODE = tuple(
    f"{_ROOT / name}/" for name in ("job_service", "generator_service", "imagegen_common", "imagegen_client", "tests")
)


def _running_tasks_of_ours() -> dict[asyncio.Task[object], str]:
    found = {}
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if task is asyncio.current_task() or task.done() or code is None:
            continue
        if code.co_filename.startswith(_OUR_CODE):
            found[task] = f"{task.get_name()} ({code.co_qualname}, {Path(code.co_filename).relative_to(_ROOT)})"
    return found


@pytest.fixture(scope="module", autouse=True)
async def no_task_outlives_its_module() -> AsyncIterator[None]:
    """Whatever a module starts (services, dispatchers, watchers, stand-in servers) has stopped once it is done.

    All tests share one event loop, so a task left running goes on acting in the modules after it: a drain that
    returned while an attempt still retried its write logged into a later test's assertions. A task may take a
    moment to wind down after its owner stopped; one still running a few seconds later has been left behind
    (and is cancelled, so that it fails this module only).
    """
    yield
    for _ in range(30):
        if not _running_tasks_of_ours():
            return
        await asyncio.sleep(0.1)
    left = _running_tasks_of_ours()
    for task in left:
        task.cancel()
    assert not left, f"still running after the module ended: {sorted(left.values())}"
