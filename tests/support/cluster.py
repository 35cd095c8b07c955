"""Helpers for the durability tests: a database of their own, polling, and reading jobs and events back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from imagegen_common.migrate import migrate
from tests.support.database import create_database, drop_database

T = TypeVar("T")
TERMINAL = ("completed", "failed", "cancelled", "expired")


@asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A migrated database for one test: its dispatchers see no other test's jobs, and it sees theirs not."""
    url = await create_database(admin_url)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(admin_url, url)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], *, within: float, every: float = 0.1
) -> T:
    """Polls `probe` until `done(result)`; returns the last result either way (the caller asserts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    result = await probe()
    while not done(result) and loop.time() < deadline:
        await asyncio.sleep(every)
        result = await probe()
    return result


async def jobs_by_id(conn: asyncpg.Connection, ids: Iterable[str]) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM generation_jobs WHERE id = ANY($1::uuid[])", list(ids))
    return {str(r["id"]): r for r in rows}


async def wait_terminal(conn: asyncpg.Connection, ids: list[str], *, within: float) -> dict[str, asyncpg.Record]:
    return await eventually(
        lambda: jobs_by_id(conn, ids),
        lambda rows: len(rows) == len(ids) and all(r["status"] in TERMINAL for r in rows.values()),
        within=within,
        every=0.25,
    )


async def events_of(conn: asyncpg.Connection, job_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM job_events WHERE job_id = $1 ORDER BY seq", job_id)
    events = []
    for row in rows:
        event = dict(row)
        detail = event["detail"]
        event["detail"] = json.loads(detail) if isinstance(detail, str) else (detail or {})
        events.append(event)
    return events


def owner_pid(lease_owner: str | None) -> int | None:
    """The pid in a JobService worker id (host:pid:random)."""
    if not lease_owner:
        return None
    parts = lease_owner.split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def check_event_history(job: asyncpg.Record, events: list[dict[str, Any]]) -> list[str]:
    """What is wrong with a finished job's history: seqs, one ending, every attempt accounted for."""
    problems: list[str] = []
    seqs = [e["seq"] for e in events]
    if seqs != list(range(1, len(events) + 1)) or seqs[-1] != job["last_event_seq"]:
        problems.append(f"seqs {seqs} are not 1..{job['last_event_seq']}")
    if events[0]["type"] != "created":
        problems.append("history does not start with created")
    terminal = [e for e in events if e["status"] in TERMINAL]
    if len(terminal) != 1 or terminal[0] is not events[-1]:
        problems.append(f"not exactly one terminal event, last: {[e['type'] for e in terminal]}")
    started = [e for e in events if e["type"] == "attempt_started"]
    if [e["attempt"] for e in started] != list(range(1, job["attempt"] + 1)):
        problems.append(f"attempt_started for attempts {[e['attempt'] for e in started]}, job at {job['attempt']}")
    # Every attempt but the last ends by going back to pending, with a reason.
    for attempt in range(1, job["attempt"]):
        endings = [
            e["type"]
            for e in events
            if e["attempt"] == attempt and e["type"] in ("retry_scheduled", "lease_expired", "handed_back")
        ]
        if len(endings) != 1:
            problems.append(f"attempt {attempt} ended {endings}")
    return problems
