"""CreateJob's metrics count the call that made a job, never an idempotent replay of it (no extra query)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from job_service.domain import Params
from job_service.metrics import InstrumentedJobStore, JobMetrics
from job_service.store import create_pool
from tests.support.cluster import fresh_database


@pytest.fixture
async def instrumented(pg_server: str) -> AsyncIterator[tuple[InstrumentedJobStore, CollectorRegistry]]:
    async with fresh_database(pg_server) as url:
        pool = await create_pool(url, min_size=1, max_size=2, statement_cache_size=100)
        registry = CollectorRegistry()
        yield InstrumentedJobStore(pool, JobMetrics(registry)), registry
        await pool.close()


def request(user_id: str, request_id: str | None) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "prompt": "a lighthouse at dusk",
        "model": "local",
        "params": Params(sample_count=2),
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
    first, made = await store.create_job(**request(user, "r1"))
    assert made and created(registry) == 1 and reserved(registry) == 2
    again, made_again = await store.create_job(**request(user, "r1"))
    assert again.id == first.id and not made_again
    replayed, _ = await store.create_job(**request(user, "r1"))
    assert replayed.id == first.id
    assert created(registry) == 1 and reserved(registry) == 2, "replays are not counted"

    other, _ = await store.create_job(**request(user, "r2"))
    without_id, _ = await store.create_job(**request(user, None))
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
