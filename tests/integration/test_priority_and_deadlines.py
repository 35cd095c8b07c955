"""Priorities with aging, and start deadlines, against real PostgreSQL and the real dispatcher.

The generator is a gate that the test opens one job at a time: slower than the jobs arrive, with one slot
(max_in_flight 1), so the order in which the dispatcher starts queued jobs is what the test reads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field

import asyncpg
import pytest

from job_service.dispatcher import Dispatcher, DispatcherConfig
from job_service.domain import (
    GenerationCompleted,
    GenerationEvent,
    GenerationStarted,
    ImageStored,
    Job,
    JobEventType,
    JobState,
    Params,
    StoredImage,
)
from job_service.state_changes import StateChange
from job_service.store import ClaimAtCreate, CreatedJob, CreateRules, JobStore, create_pool
from tests.support.cluster import events_of, eventually, fresh_database
from tests.support.creates import cancel_unfinished, create_here
from tests.support.ledger import assert_credits_consistent


@dataclass
class GatedGenerator:
    """Records the order attempts start in; each attempt completes only when the test lets one through."""

    started: list[str] = field(default_factory=list)
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        self.started.append(job.id)
        yield GenerationStarted("gated")
        await self.gate.acquire()
        path = f"{job.user_id}/{job.id}/{job.attempt}-0.png"
        yield ImageStored(StoredImage(0, f"http://storage/{path}", path, "image/png", 8, 8, 100))
        yield GenerationCompleted(1, 0, [])


@pytest.fixture(scope="module")
async def priority_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
async def store(priority_db: str) -> AsyncIterator[JobStore]:
    pool = await create_pool(priority_db, min_size=1, max_size=5, statement_cache_size=100)
    yield JobStore(pool)
    await cancel_unfinished(pool)  # nothing may stay active for the next test
    await pool.close()


@pytest.fixture
async def conn(priority_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(priority_db)
    yield connection
    await connection.close()


def one_slot(**overrides: float) -> DispatcherConfig:
    values: dict[str, float] = {
        "max_in_flight": 1,
        "poll_interval": 0.05,
        "lease_seconds": 5.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.1,
        "expiry_interval": 0.1,
    }
    values.update(overrides)
    return DispatcherConfig(owner="w1", **values)  # type: ignore[arg-type]


def create(
    store: JobStore,
    *,
    priority: int | None = None,
    aging: float = 3600.0,
    start_within: float | None = None,
    claim: ClaimAtCreate | None = None,
    user: str | None = None,
) -> Awaitable[CreatedJob]:
    return store.create_job(
        user_id=user or str(uuid.uuid4()),
        prompt="a lighthouse at dusk",
        model="local",
        params=Params(sample_count=1),
        template_id=None,
        request_id=None,
        request_hash="test",
        price_per_image=3,
        max_attempts=3,
        active_limit=10,
        new_user_credits=100,
        claim=claim,
        priority=priority,
        start_within=start_within,
        rules=CreateRules(aging_seconds=aging),
    )


async def job_of(store: JobStore, priority: int, aging: float = 3600.0) -> str:
    return (await create(store, priority=priority, aging=aging)).job.id


async def run_in_order(store: JobStore, generator: GatedGenerator, dispatcher: Dispatcher, jobs: list[str]) -> None:
    """Lets the jobs through one at a time, each once it has started, until all have completed."""
    for _ in jobs:
        count = len(generator.started)
        await eventually(lambda: asyncio.sleep(0, len(generator.started)), lambda n, count=count: n > count, within=20)  # type: ignore[misc]
        generator.gate.release()
    for job_id in jobs:
        done = await eventually(
            lambda job_id=job_id: store.get_job(job_id),  # type: ignore[misc]
            lambda j: j is not None and j.status is JobState.COMPLETED,
            within=20,
        )
        assert done is not None and done.status is JobState.COMPLETED


async def test_queued_jobs_start_by_priority_then_age_while_the_generator_lags_behind(store: JobStore) -> None:
    generator = GatedGenerator()
    dispatcher = Dispatcher(store, generator, one_slot())
    dispatcher.start()
    try:
        busy = await job_of(store, 5)
        await eventually(lambda: asyncio.sleep(0, list(generator.started)), lambda s: s == [busy], within=20)
        # Arriving while the only slot is busy, faster than the generator finishes them.
        low_1 = await job_of(store, 1)
        high_1 = await job_of(store, 8)
        mid = await job_of(store, 5)
        high_2 = await job_of(store, 8)
        low_2 = await job_of(store, 1)
        top = await job_of(store, 9)
        await run_in_order(store, generator, dispatcher, [busy, top, high_1, high_2, mid, low_1, low_2])
    finally:
        await dispatcher.drain(1.0)

    assert generator.started == [busy, top, high_1, high_2, mid, low_1, low_2], (
        "highest priority first, then the oldest of a priority"
    )


async def test_an_old_low_priority_job_overtakes_high_priority_jobs_created_after_the_aging_bound(
    store: JobStore,
) -> None:
    # One step per 0.4 s of waiting: a priority-0 job is passed only by jobs created within 9 * 0.4 = 3.6 s after it.
    aging = 0.4
    generator = GatedGenerator()
    dispatcher = Dispatcher(store, generator, one_slot())
    dispatcher.start()
    try:
        busy = await job_of(store, 9, aging)
        await eventually(lambda: asyncio.sleep(0, list(generator.started)), lambda s: s == [busy], within=20)
        old_low = await job_of(store, 0, aging)
        soon_high = await job_of(store, 9, aging)  # within the bound: still goes first
        await asyncio.sleep(9 * aging + 0.6)
        late_high = [await job_of(store, 9, aging) for _ in range(3)]  # past the bound
        late_mid = await job_of(store, 5, aging)
        await run_in_order(store, generator, dispatcher, [busy, soon_high, old_low, *late_high, late_mid])
    finally:
        await dispatcher.drain(1.0)

    assert generator.started == [busy, soon_high, old_low, *late_high, late_mid]


async def test_a_job_created_with_room_is_not_claimed_at_create_while_a_job_ahead_of_it_waits(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = GatedGenerator()
    # Never started: its claim loop does not run, so only the create itself may claim.
    dispatcher = Dispatcher(store, generator, one_slot(max_in_flight=4))
    try:
        waiting = (await create(store, priority=7)).job

        behind, _ = await create_here(dispatcher, lambda claim: create(store, priority=3, claim=claim))
        assert behind.status is JobState.PENDING, "a lower priority must not jump the queue at create"

        ahead, _ = await create_here(dispatcher, lambda claim: create(store, priority=9, claim=claim))
        assert ahead.status is JobState.GENERATING, "a job that goes first anyway is claimed as it is created"
        assert ahead.lease_owner == "w1"
        rows = await conn.fetch(
            "SELECT id, status FROM generation_jobs WHERE id = ANY($1::uuid[])", [waiting.id, behind.id]
        )
        assert {r["status"] for r in rows} == {"pending"}
    finally:
        generator.gate.release()
        await dispatcher.drain(1.0)


async def test_a_job_not_started_by_its_deadline_expires_with_its_credits_released_and_watchers_told(
    store: JobStore, conn: asyncpg.Connection, priority_db: str
) -> None:
    generator = GatedGenerator()
    dispatcher = Dispatcher(store, generator, one_slot())
    user = str(uuid.uuid4())
    heard: list[str] = []
    listener = await asyncpg.connect(priority_db)
    await listener.add_listener("imagegen_jobs", lambda *args: heard.append(args[3]))
    dispatcher.start()
    try:
        busy = await job_of(store, 9)  # holds the only slot
        await eventually(lambda: asyncio.sleep(0, list(generator.started)), lambda s: s == [busy], within=20)
        job = (await create(store, user=user, start_within=1.0)).job
        assert job.start_deadline is not None and job.credits_reserved == 3
        assert await conn.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user) == 97

        expired = await eventually(
            lambda: store.get_job(job.id), lambda j: j is not None and j.status.terminal, within=20
        )
    finally:
        generator.gate.release()
        await dispatcher.drain(1.0)
        await listener.close()

    assert expired is not None and expired.status is JobState.EXPIRED
    assert (expired.attempt, expired.credits_reserved, expired.credits_charged) == (0, 0, 0)
    assert expired.error_code == "START_DEADLINE_EXCEEDED"
    assert expired.completed_at is not None and expired.completed_at >= expired.start_deadline  # type: ignore[operator]
    assert generator.started == [busy], "the expired job never ran"
    assert await conn.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user) == 100
    ledger = await conn.fetch("SELECT kind, amount FROM credit_ledger WHERE job_id = $1 ORDER BY id", job.id)
    assert [(r["kind"], r["amount"]) for r in ledger] == [("reserve", -3), ("release", 3), ("capture", 0)]
    assert [e["type"] for e in await events_of(conn, job.id)] == ["created", "expired"]
    assert f"{job.id}:2:expired" in heard, "watchers are woken by the NOTIFY of the expired event"
    await assert_credits_consistent(conn)


async def test_the_claim_never_takes_a_job_past_its_deadline_and_a_started_job_never_expires(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    never_started = (await create(store, start_within=1.0)).job
    started = (await create(store, start_within=1.0, priority=9)).job
    claimed = await store.claim("w1", 1, 30.0)
    assert [j.id for j in claimed] == [started.id]
    # Back to pending between attempts, as after a retryable failure: it has started, so its deadline is over.
    retried = await store.advance(
        started.id,
        StateChange(event=JobEventType.RETRY_SCHEDULED, to=JobState.PENDING, retry_delay=0, count_failure=True),
        attempt=1,
        from_states=(JobState.GENERATING,),
    )
    assert retried is not None and retried.status is JobState.PENDING
    await asyncio.sleep(1.3)

    assert [j.id for j in await store.claim("w1", 10, 30.0)] == [started.id], "the expired job is not claimed"
    assert [j.id for j in await store.expire_due(100)] == [never_started.id]
    assert [j.id for j in await store.expire_due(100)] == [], "once"
    still = await store.get_job(started.id)
    assert still is not None and still.status is JobState.GENERATING and still.attempt == 2
    await assert_credits_consistent(conn)
