"""The WatchJob fan-out's ordering rules, against a store whose reads can be held up mid-way."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from job_service.domain import Job, JobEvent, JobEventType, JobState, Params
from job_service.notifications import JobNotifications, Subscription


class SlowStore:
    """A job's events in memory; each read takes its snapshot when called and may be held before answering."""

    def __init__(self) -> None:
        self.job_id = str(uuid.uuid4())
        self.events: list[JobEvent] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.reads = 0
        self.commit(JobEventType.CREATED)

    def commit(self, event_type: JobEventType, status: JobState = JobState.PENDING) -> int:
        seq = len(self.events) + 1
        self.events.append(JobEvent(self.job_id, seq, event_type, status, 0, datetime.now(UTC)))
        return seq

    def job(self, last_seq: int) -> Job:
        now = datetime.now(UTC)
        fields: dict[str, Any] = dict.fromkeys(Job.__dataclass_fields__)
        fields.update(
            id=self.job_id, status=self.events[last_seq - 1].status, params=Params(), images=[], filtered_reasons=[],
            created_at=now, updated_at=now, next_attempt_at=now, last_event_seq=last_seq,
        )  # fmt: skip
        return Job(**fields)

    async def job_and_events_after(self, job_id: str, seq: int) -> tuple[Job, list[JobEvent]]:
        self.reads += 1
        snapshot = list(self.events)  # what a REPEATABLE READ transaction would see from here on
        await self.gate.wait()
        return self.job(len(snapshot)), [e for e in snapshot if e.seq > seq]


def notify(hub: JobNotifications, store: SlowStore, seq: int, event: JobEventType) -> None:
    hub._notified(None, 0, "imagegen_jobs", f"{store.job_id}:{seq}:{event.value}")


async def received(subscription: Subscription, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        _job, event = await asyncio.wait_for(subscription.queue.get(), timeout=2)
        seqs.append(event.seq)
    return seqs


async def test_a_notification_arriving_while_a_read_is_under_way_is_not_lost() -> None:
    store = SlowStore()
    hub = JobNotifications("postgresql://unused", store)  # type: ignore[arg-type]
    watcher = hub.subscribe(store.job_id)
    watcher.start_from(1)
    await asyncio.sleep(0)

    store.gate.clear()
    notify(hub, store, store.commit(JobEventType.ATTEMPT_STARTED, JobState.GENERATING), JobEventType.ATTEMPT_STARTED)
    await asyncio.sleep(0.01)  # the read of seq 2 has taken its snapshot and waits
    # The terminal event commits after that snapshot; its NOTIFY arrives while the read is still out.
    notify(hub, store, store.commit(JobEventType.COMPLETED, JobState.COMPLETED), JobEventType.COMPLETED)
    store.gate.set()

    assert await received(watcher, 2) == [2, 3]
    watcher.close()


async def test_a_second_watcher_with_an_older_snapshot_gets_the_events_the_first_already_has() -> None:
    store = SlowStore()
    hub = JobNotifications("postgresql://unused", store)  # type: ignore[arg-type]
    first = hub.subscribe(store.job_id)
    second = hub.subscribe(store.job_id)  # subscribed, still reading its snapshot (seq 1)
    first.start_from(1)
    for event in (JobEventType.ATTEMPT_STARTED, JobEventType.GENERATION_STARTED):
        notify(hub, store, store.commit(event, JobState.GENERATING), event)
    assert await received(first, 2) == [2, 3]

    second.start_from(1)
    assert await received(second, 2) == [2, 3], "no gap between the second watcher's snapshot and its events"
    notify(hub, store, store.commit(JobEventType.COMPLETED, JobState.COMPLETED), JobEventType.COMPLETED)
    assert await received(first, 1) == [4]
    assert await received(second, 1) == [4]
    assert first.queue.empty() and second.queue.empty(), "nothing twice"
    first.close()
    second.close()


async def test_published_events_need_no_read_and_never_jump_a_gap() -> None:
    store = SlowStore()
    hub = JobNotifications("postgresql://unused", store)  # type: ignore[arg-type]
    watcher = hub.subscribe(store.job_id)
    watcher.start_from(1)
    await asyncio.sleep(0.01)  # the read after the snapshot (nothing new yet)
    reads = store.reads

    # This process commits seq 2 and publishes it; its NOTIFY then finds the watcher up to date.
    seq = store.commit(JobEventType.ATTEMPT_STARTED, JobState.GENERATING)
    hub.publish(store.job(seq), store.events[seq - 1])
    notify(hub, store, seq, JobEventType.ATTEMPT_STARTED)
    assert await received(watcher, 1) == [2]
    await asyncio.sleep(0.01)
    assert store.reads == reads, "the NOTIFY of an event already delivered reads nothing"

    # Another replica commits seq 3 (its NOTIFY is late); this process publishes seq 4: the watcher must not
    # get 4 before 3, so the feed reads and delivers both in order.
    store.commit(JobEventType.GENERATION_STARTED, JobState.GENERATING)
    seq = store.commit(JobEventType.COMPLETED, JobState.COMPLETED)
    hub.publish(store.job(seq), store.events[seq - 1])
    assert await received(watcher, 2) == [3, 4]
    assert store.reads == reads + 1
    notify(hub, store, 3, JobEventType.GENERATION_STARTED)
    notify(hub, store, 4, JobEventType.COMPLETED)
    await asyncio.sleep(0.01)
    assert watcher.queue.empty(), "nothing twice"
    watcher.close()


async def test_a_watcher_whose_snapshot_is_current_starts_without_a_read_and_misses_nothing() -> None:
    store = SlowStore()
    hub = JobNotifications("postgresql://unused", store)  # type: ignore[arg-type]
    watcher = hub.subscribe(store.job_id)
    watcher.start_from(1)  # no NOTIFY beyond seq 1 was handled: nothing to read
    await asyncio.sleep(0.01)
    assert store.reads == 0

    # An event committed after the snapshot arrives with its NOTIFY.
    notify(hub, store, store.commit(JobEventType.ATTEMPT_STARTED, JobState.GENERATING), JobEventType.ATTEMPT_STARTED)
    assert await received(watcher, 1) == [2]
    assert store.reads == 1
    watcher.close()


@pytest.mark.parametrize("missed_while", ["its NOTIFY was handled", "the LISTEN connection was down"])
async def test_an_event_after_the_snapshot_that_came_before_the_watcher_started_is_read_once(missed_while: str) -> None:
    store = SlowStore()
    hub = JobNotifications("postgresql://unused", store)  # type: ignore[arg-type]
    watcher = hub.subscribe(store.job_id)  # reading its snapshot (seq 1) when seq 2 commits and ...
    seq = store.commit(JobEventType.ATTEMPT_STARTED, JobState.GENERATING)
    if missed_while == "its NOTIFY was handled":
        notify(hub, store, seq, JobEventType.ATTEMPT_STARTED)  # ... the watcher, not started, is skipped
    else:
        hub._resync_all()  # ... its NOTIFY is lost; the connection comes back and the feed owes a read
    await asyncio.sleep(0.01)  # the feed cannot read for a watcher that has not started
    watcher.start_from(1)
    assert await received(watcher, 1) == [2]
    assert store.reads == 1
    watcher.close()
