"""The LISTEN fan-out: many watchers of one job, subscribing while it changes, each get every event in order."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from job_service.domain import EventType, JobStatus, Params
from job_service.notifications import JobNotifications
from job_service.store import JobStore, create_pool
from tests.support.cluster import fresh_database


@pytest.fixture
async def store_and_dsn(pg_server: str) -> AsyncIterator[tuple[JobStore, str]]:
    async with fresh_database(pg_server) as url:
        pool = await create_pool(url, min_size=1, max_size=10, statement_cache_size=100)
        yield JobStore(pool), url
        await pool.close()


async def test_watchers_subscribing_while_the_job_changes_each_get_every_later_event_once(
    store_and_dsn: tuple[JobStore, str],
) -> None:
    store, dsn = store_and_dsn
    hub = JobNotifications(dsn, store)
    await hub.start()
    await asyncio.wait_for(hub.connected.wait(), timeout=10)
    job, _created = await store.create_job(
        user_id=str(uuid.uuid4()),
        prompt="watched",
        model="local",
        params=Params(sample_count=1),
        template_id=None,
        request_id=None,
        request_hash="x",
        price_per_image=1,
        max_attempts=5,
        active_limit=10,
        new_user_credits=100,
    )
    changes = 120

    async def write() -> None:
        for n in range(changes):
            await store.advance(
                job.id, attempt=None, from_statuses=(JobStatus.PENDING,), event=EventType.RETRY_SCHEDULED,
                message=f"change {n}",
            )  # fmt: skip
            if n % 10 == 0:
                await asyncio.sleep(0.01)
        await store.advance(
            job.id, attempt=None, from_statuses=(JobStatus.PENDING,), event=EventType.CANCELLED,
            to=JobStatus.CANCELLED,
        )  # fmt: skip

    async def watch() -> tuple[int, list[int]]:
        await asyncio.sleep(random.uniform(0, 0.5))
        # As JobManager.watch does: subscribe, then read the snapshot, then follow from its seq.
        subscription = hub.subscribe(job.id)
        try:
            snapshot = await store.get_job(job.id)
            assert snapshot is not None
            if snapshot.status.terminal:
                return snapshot.last_event_seq, []
            subscription.start_from(snapshot.last_event_seq)
            seqs: list[int] = []
            while True:
                _current, event = await asyncio.wait_for(subscription.queue.get(), timeout=10)
                seqs.append(event.seq)
                if event.status.terminal:
                    return snapshot.last_event_seq, seqs
        finally:
            subscription.close()

    try:
        results = await asyncio.gather(write(), *(watch() for _ in range(40)))
    finally:
        await hub.stop()
    final = (await store.get_job(job.id)).last_event_seq  # type: ignore[union-attr]
    assert final == 1 + changes + 1
    for start, seqs in results[1:]:  # type: ignore[misc]
        assert seqs == list(range(start + 1, final + 1)), (start, seqs)
