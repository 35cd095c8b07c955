"""Generator faults as JobService sees them: a generator that is down delays jobs, a permanent fault fails them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from generator_service import server as generator_server
from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from job_service import server as job_server
from tests.generator.fake_google import FakeGeminiImagen, fail
from tests.support.cluster import events_of, eventually, fresh_database
from tests.support.ledger import assert_credits_consistent
from tests.support.processes import free_port
from tests.support.services import generator_settings, job_settings, running_services

FAST_IMAGEN = "gemini-api/imagen-4.0-fast-generate-001"


@pytest.fixture
async def own_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


async def test_a_generator_that_is_down_leaves_the_job_pending_for_retry_until_it_is_back(
    own_db: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here yet
    jobs = await job_server.start(
        job_settings(own_db, f"127.0.0.1:{port}", max_attempts=2, retry_base_seconds=0.1, retry_max_seconds=0.3)
    )
    user = str(uuid.uuid4())
    conn = await asyncpg.connect(own_db)
    try:
        async with ImageGenClient(f"127.0.0.1:{jobs.port}", mint_token(DEV_JWT_SECRET, user_id=user)) as client:
            job = await client.create_job("a lighthouse at dusk", model="local", sample_count=1)

            async def retries() -> list[dict[str, object]]:
                return [e for e in await events_of(conn, job.id) if e["type"] == "retry_scheduled"]

            seen = await eventually(retries, lambda r: len(r) >= 4, within=30)
            assert len(seen) >= 4, "the dispatcher keeps retrying"
            row = await conn.fetchrow("SELECT * FROM generation_jobs WHERE id = $1", job.id)
            # More attempts than max_attempts, none counted, never failed: it waits for the generator.
            assert row["status"] in ("pending", "generating") and row["attempt"] > row["max_attempts"]
            assert row["failed_attempts"] == 0
            assert {e["detail"]["error_code"] for e in seen} == {"GENERATOR_UNAVAILABLE"}
            assert all(e["status"] == "pending" for e in seen)
            assert "failed" not in [e["type"] for e in await events_of(conn, job.id)]

            generator = await generator_server.start(generator_settings(tmp_path / "storage", port=port))
            try:
                done = await client.wait(job.id, timeout=60)
            finally:
                await generator.stop()
        assert done.state == pb.JOB_STATE_COMPLETED and done.credits_charged == 1
        await assert_credits_consistent(conn)
    finally:
        await conn.close()
        await jobs.stop()


async def test_a_permanent_provider_failure_fails_the_job_at_once(own_db: str, tmp_path: Path) -> None:
    api = FakeGeminiImagen()
    await api.start()
    api.filtered = {0}  # the only image is withheld by the safety filters: nothing to deliver, ever
    user = str(uuid.uuid4())
    conn = await asyncpg.connect(own_db)
    try:
        async with (
            running_services(
                own_db,
                tmp_path / "storage",
                generator={"gemini_api_key": "test-api-key", "gemini_base_url": api.url},
            ) as services,
            services.client(user) as client,
        ):
            job = await client.create_job("a lighthouse at dusk", model=FAST_IMAGEN, sample_count=1)
            done = await client.wait(job.id, timeout=60)
        assert done.state == pb.JOB_STATE_FAILED
        assert done.error.reason == "ALL_IMAGES_FILTERED"
        assert (done.attempt, done.credits_charged, done.credits_reserved) == (1, 0, 0)
        types = [e["type"] for e in await events_of(conn, job.id)]
        assert "retry_scheduled" not in types and types[-1] == "failed"
        assert len(api.requests) == 1, "one provider call, no retry"
        assert await conn.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user) == 100
        await assert_credits_consistent(conn)
    finally:
        await conn.close()
        await api.stop()


async def test_a_providers_retry_after_travels_to_the_jobs_next_attempt(own_db: str, tmp_path: Path) -> None:
    # 429 with Retry-After: 30 -> the generator gives up at once (no retries of its own) and says so in
    # google.rpc.RetryInfo -> JobService schedules the next attempt no earlier than 30 s later.
    api = FakeGeminiImagen()
    await api.start()
    api.faults.append(fail(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", retry_after="30"))
    conn = await asyncpg.connect(own_db)
    try:
        async with (
            running_services(
                own_db,
                tmp_path / "storage",
                generator={"gemini_api_key": "test-api-key", "gemini_base_url": api.url, "provider_max_retries": 0},
            ) as services,
            services.client(str(uuid.uuid4())) as client,
        ):
            job = await client.create_job("a lighthouse at dusk", model=FAST_IMAGEN, sample_count=1)
            row = await eventually(
                lambda: conn.fetchrow("SELECT * FROM generation_jobs WHERE id = $1", job.id),
                lambda r: r["error_code"] is not None,
                within=30,
            )
            retry = [e for e in await events_of(conn, job.id) if e["type"] == "retry_scheduled"]
            assert row["status"] == "pending" and row["error_code"] == "PROVIDER_RATE_LIMITED"
            assert len(retry) == 1 and (row["next_attempt_at"] - retry[0]["at"]).total_seconds() >= 30.0 - 0.01
            assert len(api.requests) == 1
            await client.cancel_job(job.id)
        await assert_credits_consistent(conn)
    finally:
        await conn.close()
        await api.stop()
