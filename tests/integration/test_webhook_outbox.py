"""The webhook outbox in SQL: the triggers queue deliveries with their event, the claim keeps a job's order."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from job_service.store import create_pool
from job_service.webhook_store import WebhookStore


# These tests insert bare job rows (not made by the create functions, never run): in the shared database a
# JobService of a later module would claim them. Each test gets a database of its own.
@pytest.fixture
async def db(private_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(private_database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def store(private_database_url: str) -> AsyncIterator[WebhookStore]:
    pool = await create_pool(private_database_url, min_size=1, max_size=2, statement_cache_size=0)
    yield WebhookStore(pool)
    await pool.close()


async def a_job_with_webhook(db: asyncpg.Connection, events: list[str]) -> str:
    """A job inserted as the create functions insert one: the webhook inside params.

    It is inserted already ended (cancelled), in a database of the test's own: a pending job with hand-made events
    is claimable, and a claim of it collides with its event seq 1.
    """
    params = {"sample_count": 1, "webhook": {"url": "https://hooks.example.com/x", "events": events}}
    job_id = await db.fetchval(
        """INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts, status, completed_at)
           VALUES ($1, 'p', 'local', $2::jsonb, 3, 'cancelled', now()) RETURNING id""",
        uuid.uuid4(),
        json.dumps(params),
    )
    return str(job_id)


async def add_event(db: asyncpg.Connection, job_id: str, seq: int, kind: str) -> None:
    await db.execute(
        "INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES ($1, $2, $3, 'generating', 1)",
        job_id,
        seq,
        kind,
    )


async def test_the_webhook_moves_out_of_params_into_its_columns(db: asyncpg.Connection) -> None:
    job_id = await a_job_with_webhook(db, ["job.completed"])
    row = await db.fetchrow("SELECT params, webhook_url, webhook_events FROM generation_jobs WHERE id = $1", job_id)
    assert json.loads(row["params"]) == {"sample_count": 1}, "params keeps generation parameters only"
    assert (row["webhook_url"], row["webhook_events"]) == ("https://hooks.example.com/x", ["job.completed"])


async def test_subscribed_events_are_queued_in_their_transaction_and_others_are_not(db: asyncpg.Connection) -> None:
    job_id = await a_job_with_webhook(db, ["job.started", "job.completed"])
    await add_event(db, job_id, 1, "created")
    await add_event(db, job_id, 2, "attempt_started")
    await add_event(db, job_id, 3, "image_stored")
    try:
        async with db.transaction():
            await add_event(db, job_id, 4, "completed")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    queued = await db.fetch("SELECT seq, type FROM webhook_deliveries WHERE job_id = $1 ORDER BY seq", job_id)
    assert [(r["seq"], r["type"]) for r in queued] == [(2, "job.started")], "a rolled-back event queues nothing"
    await add_event(db, job_id, 4, "completed")
    queued = await db.fetch("SELECT seq, type FROM webhook_deliveries WHERE job_id = $1 ORDER BY seq", job_id)
    assert [(r["seq"], r["type"]) for r in queued] == [(2, "job.started"), (4, "job.completed")]


async def test_a_jobs_later_delivery_waits_for_the_earlier_one(db: asyncpg.Connection, store: WebhookStore) -> None:
    job_id = await a_job_with_webhook(db, ["job.started", "job.completed"])
    await add_event(db, job_id, 1, "attempt_started")
    await add_event(db, job_id, 2, "completed")
    first = await store.claim("replica-a", 10, 30.0)
    assert [d.seq for d in first] == [1], "only the earliest pending delivery of the job"
    assert await store.claim("replica-b", 10, 30.0) == [], "the next waits while the first is under way"
    # The first fails and waits a minute before its next send: nothing of this job is due before then, so a
    # sender sleeps instead of polling the blocked second delivery in a loop.
    await db.execute(
        "UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL, "
        "next_attempt_at = now() + interval '60 seconds' WHERE job_id = $1 AND seq = 1",
        job_id,
    )
    due_in = await store.next_due_in()
    assert due_in is not None and due_in > 50, due_in
    await db.execute("UPDATE webhook_deliveries SET state = 'failed' WHERE job_id = $1 AND seq = 1", job_id)
    assert [d.seq for d in await store.claim("replica-b", 10, 30.0)] == [2], "given up: the next one goes"
    assert (await store.claim("replica-a", 10, 30.0)) == []
