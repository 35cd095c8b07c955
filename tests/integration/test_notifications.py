"""The LISTEN fan-out: many watchers of one job, subscribing while it changes, each get every event in order."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import pytest

from job_service.domain import Job, JobEvent, JobEventType, JobState, Params, StoredImage
from job_service.fanout import EventFanout
from job_service.notifications import JobNotifications
from job_service.state_changes import StateChange
from job_service.store import CreatedJob, JobStore, create_pool
from tests.support.cluster import fresh_database


@pytest.fixture
async def fanout() -> EventFanout:
    return EventFanout()


@pytest.fixture
async def store_and_dsn(pg_server: str, fanout: EventFanout) -> AsyncIterator[tuple[JobStore, str]]:
    async with fresh_database(pg_server) as url:
        pool = await create_pool(url, min_size=1, max_size=10, statement_cache_size=100)
        yield JobStore(pool, fanout), url
        await pool.close()


class Heard:
    """Watchers that only note what they hear."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, JobEventType]] = []

    def publish(self, job: Job, event: JobEvent) -> None:
        self.events.append((job.id, event.seq, event.type))


@pytest.mark.parametrize("writer", ["this process", "another process"])
async def test_watchers_subscribing_while_the_job_changes_each_get_every_later_event_once(
    store_and_dsn: tuple[JobStore, str], fanout: EventFanout, writer: str
) -> None:
    store, dsn = store_and_dsn
    hub = JobNotifications(dsn, store, writes=fanout)
    if writer == "this process":  # as server.py wires it: the writes reach the watchers without a read
        fanout.deliver_to(watchers=hub)
    await hub.start()
    await asyncio.wait_for(hub.connected.wait(), timeout=10)
    made = await store.create_job(
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
    job = made.job
    changes = 120

    async def write() -> None:
        for n in range(changes):
            await store.advance(
                job.id, StateChange(event=JobEventType.RETRY_SCHEDULED, message=f"change {n}"), attempt=None,
                from_states=(JobState.PENDING,),
            )  # fmt: skip
            if n % 10 == 0:
                await asyncio.sleep(0.01)
        await store.advance(
            job.id, StateChange(event=JobEventType.CANCELLED, to=JobState.CANCELLED), attempt=None,
            from_states=(JobState.PENDING,),
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


async def test_an_event_published_by_its_writer_is_the_event_the_database_holds(
    store_and_dsn: tuple[JobStore, str], fanout: EventFanout
) -> None:
    store, dsn = store_and_dsn
    hub = JobNotifications(dsn, store, writes=fanout)
    fanout.deliver_to(watchers=hub)
    await hub.start()
    await asyncio.wait_for(hub.connected.wait(), timeout=10)
    made = await store.create_job(
        user_id=str(uuid.uuid4()), prompt="published", model="local", params=Params(sample_count=1),
        template_id=None, request_id=None, request_hash="x", price_per_image=3, max_attempts=5, active_limit=10,
        new_user_credits=100,
    )  # fmt: skip
    job = made.job
    subscription = hub.subscribe(job.id)
    try:
        subscription.start_from(job.last_event_seq)
        [claimed] = await store.claim("worker-a", 1, 30.0)
        image = StoredImage(0, "http://storage/0.png", "u/j/1/0.png", "image/png", 1024, 1024, 5000)
        written = await store.advance_batch(
            job.id,
            [
                StateChange(event=JobEventType.GENERATION_STARTED, message="provider local"),
                StateChange(event=JobEventType.IMAGE_STORED, image=image),
                StateChange(event=JobEventType.COMPLETED, to=JobState.COMPLETED, filtered_count=0, filtered_reasons=()),
            ],
            attempt=claimed.attempt, from_states=(JobState.GENERATING,),
        )  # fmt: skip
        assert len(written) == 3
        got = [await asyncio.wait_for(subscription.queue.get(), timeout=5) for _ in range(4)]
    finally:
        subscription.close()
        await hub.stop()
    _job, stored = await store.job_and_events_after(job.id, job.last_event_seq)
    assert [event for _job, event in got] == stored  # seq, type, status, attempt, time and message alike
    assert [event.type for event in stored] == [
        JobEventType.ATTEMPT_STARTED,
        JobEventType.GENERATION_STARTED,
        JobEventType.IMAGE_STORED,
        JobEventType.COMPLETED,
    ]
    final, _event = got[-1]
    assert final.status is JobState.COMPLETED and final.credits_charged == 3 and len(final.images) == 1


async def test_the_writer_hears_of_a_created_job_once_and_not_of_its_idempotent_replay(
    store_and_dsn: tuple[JobStore, str], fanout: EventFanout
) -> None:
    store, _dsn = store_and_dsn
    heard = Heard()
    fanout.deliver_to(watchers=heard)

    async def create() -> CreatedJob:
        return await store.create_job(
            user_id=user, prompt="once", model="local", params=Params(sample_count=1), template_id=None,
            request_id="same-request", request_hash="h", price_per_image=1, max_attempts=5, active_limit=10,
            new_user_credits=100,
        )  # fmt: skip

    user = str(uuid.uuid4())
    first, again = await create(), await create()
    assert (first.created, again.created) == (True, False) and again.job.id == first.job.id
    assert heard.events == [(first.job.id, 1, JobEventType.CREATED)]


async def test_a_failing_listener_does_not_make_a_committed_write_look_failed(
    store_and_dsn: tuple[JobStore, str], fanout: EventFanout
) -> None:
    store, _dsn = store_and_dsn

    class Broken:
        def publish(self, _job: Job, _event: JobEvent) -> None:
            raise RuntimeError("watcher bug")

    fanout.deliver_to(watchers=Broken())
    made = await store.create_job(
        user_id=str(uuid.uuid4()), prompt="kept", model="local", params=Params(sample_count=1), template_id=None,
        request_id=None, request_hash="h", price_per_image=1, max_attempts=5, active_limit=10, new_user_credits=100,
    )  # fmt: skip
    cancelled = await store.advance(
        made.job.id, StateChange(event=JobEventType.CANCELLED, to=JobState.CANCELLED), attempt=None,
        from_states=(JobState.PENDING,),
    )  # fmt: skip
    assert made.created and cancelled is not None and cancelled.status is JobState.CANCELLED
    assert (await store.get_job(made.job.id)).status is JobState.CANCELLED  # type: ignore[union-attr]
