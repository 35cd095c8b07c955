"""The credit and transition metrics the store's writes report: CreateJob counts the call that made a job, never
an idempotent replay of it; a job's end counts exactly what its settlement moved in the ledger. Neither costs a
query of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from job_service.domain import JobEventType, JobState, Params, StoredImage
from job_service.metrics import InstrumentedJobStore, JobMetrics
from job_service.state_changes import StateChange
from job_service.store import create_pool
from tests.support.cluster import fresh_database


@pytest.fixture
async def instrumented(pg_server: str) -> AsyncIterator[tuple[InstrumentedJobStore, CollectorRegistry]]:
    async with fresh_database(pg_server) as url:
        pool = await create_pool(url, min_size=1, max_size=2, statement_cache_size=100)
        registry = CollectorRegistry()
        yield InstrumentedJobStore(pool, JobMetrics(registry)), registry
        await pool.close()


def request(user_id: str, request_id: str | None, sample_count: int = 2) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "prompt": "a lighthouse at dusk",
        "model": "local",
        "params": Params(sample_count=sample_count),
        "template_id": None,
        "request_id": request_id,
        "request_hash": "h",
        "price_per_image": 1,
        "max_attempts": 3,
        "active_limit": 10,
        "new_user_credits": 100,
    }


def created(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("imagegen_job_transitions_total", {"event": "created", "state": "pending"}) or 0


def reserved(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("imagegen_credits_total", {"kind": "reserved"}) or 0


async def test_a_replay_is_not_counted_and_costs_no_extra_query(
    instrumented: tuple[InstrumentedJobStore, CollectorRegistry],
) -> None:
    store, registry = instrumented
    user = str(uuid.uuid4())
    made = await store.create_job(**request(user, "r1"))
    first = made.job
    assert made.created and created(registry) == 1 and reserved(registry) == 2
    again = await store.create_job(**request(user, "r1"))
    assert again.job.id == first.id and not again.created
    replayed = (await store.create_job(**request(user, "r1"))).job
    assert replayed.id == first.id
    assert created(registry) == 1 and reserved(registry) == 2, "replays are not counted"

    other = (await store.create_job(**request(user, "r2"))).job
    without_id = (await store.create_job(**request(user, None))).job
    assert len({first.id, other.id, without_id.id}) == 3
    assert created(registry) == 3 and reserved(registry) == 6


async def test_the_original_sql_function_still_creates_and_replays(
    instrumented: tuple[InstrumentedJobStore, CollectorRegistry],
) -> None:
    store, _ = instrumented
    user = str(uuid.uuid4())
    call = (
        "SELECT id, credits_reserved FROM imagegen_create_job($1, 'p', 'local', '{}', NULL, $2, 'h', 1, 2, 3, 10, 100)"
    )
    pool = store._pool  # the raw SQL API other callers use
    first = await pool.fetchrow(call, user, "r1")
    second = await pool.fetchrow(call, user, "r1")
    assert first["id"] == second["id"] and first["credits_reserved"] == 2
    assert await pool.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user) == 98


def credits(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("imagegen_credits_total", {"kind": kind}) or 0


async def test_each_settlement_counts_what_the_ledger_released_and_captured(
    instrumented: tuple[InstrumentedJobStore, CollectorRegistry],
) -> None:
    store, registry = instrumented
    pool = store._pool
    user = str(uuid.uuid4())
    delivered_two = (await store.create_job(**request(user, "a", sample_count=4))).job
    fails = (await store.create_job(**request(user, "b", sample_count=3))).job
    claimed = {job.id: job for job in await store.claim("replica-1", 10, 60.0)}
    assert set(claimed) == {delivered_two.id, fails.id}
    stays_pending = (await store.create_job(**request(user, "c", sample_count=2))).job

    def image(index: int) -> StoredImage:
        path = f"{user}/{delivered_two.id}/1-{index}.png"
        return StoredImage(index, f"http://storage.test/{path}", path, "image/png", 1024, 1024, 1000)

    running = (JobState.GENERATING,)
    # Two of four images, and the completion, in one transaction: 4 released, 2 captured.
    written = await store.advance_batch(
        delivered_two.id,
        [
            StateChange(event=JobEventType.IMAGE_STORED, image=image(0)),
            StateChange(event=JobEventType.IMAGE_STORED, image=image(1)),
            StateChange(event=JobEventType.COMPLETED, to=JobState.COMPLETED, filtered_count=2, filtered_reasons=()),
        ],
        attempt=1,
        from_states=running,
    )
    assert written[-1].status is JobState.COMPLETED and written[-1].credits_charged == 2
    assert (credits(registry, "released"), credits(registry, "captured")) == (4, 2)
    # A failure alone: 3 released, nothing captured.
    failed = await store.advance(
        fails.id, StateChange(event=JobEventType.FAILED, to=JobState.FAILED, error_code="X"), attempt=1,
        from_states=running,
    )  # fmt: skip
    assert failed is not None and failed.status is JobState.FAILED
    # A pending job cancelled: 2 released.
    cancelled = await store.advance(
        stays_pending.id,
        StateChange(event=JobEventType.CANCELLED, to=JobState.CANCELLED),
        attempt=0,
        from_states=(JobState.PENDING,),
    )
    assert cancelled is not None and cancelled.status is JobState.CANCELLED
    # A write the fence refuses settles nothing and counts nothing.
    refused = await store.advance(fails.id, StateChange(event=JobEventType.CANCELLED), attempt=1, from_states=running)
    assert refused is None

    ledger = await pool.fetchrow(
        """SELECT sum(amount) FILTER (WHERE kind = 'release') AS released,
                  sum(-amount) FILTER (WHERE kind = 'capture') AS captured
           FROM credit_ledger WHERE user_id = $1""",
        user,
    )
    assert (ledger["released"], ledger["captured"]) == (9, 2)
    assert (credits(registry, "released"), credits(registry, "captured")) == (9, 2)
    assert credits(registry, "reserved") == 9


async def test_an_expired_job_is_counted_as_a_transition_and_its_whole_reservation_as_released(
    instrumented: tuple[InstrumentedJobStore, CollectorRegistry],
) -> None:
    store, registry = instrumented
    user = str(uuid.uuid4())
    job = (await store.create_job(**request(user, None, sample_count=3), start_within=1.0)).job
    await asyncio.sleep(1.2)

    expired = await store.expire_due(10)

    assert [j.id for j in expired] == [job.id] and expired[0].status is JobState.EXPIRED
    transitions = registry.get_sample_value("imagegen_job_transitions_total", {"event": "expired", "state": "expired"})
    assert transitions == 1
    assert (credits(registry, "released"), credits(registry, "captured")) == (3, 0)
