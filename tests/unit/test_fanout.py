"""Where a committed event goes inside one process (job_service.fanout), without a database."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from job_service.domain import Job, JobEvent, JobEventType, JobState
from job_service.fanout import EventFanout
from tests.support.memory_store import MemoryStore


class Heard:
    """Stands for all three receivers; notes who heard what, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def publish(self, job: Job, event: JobEvent) -> None:
        self.log.append(("watchers", event.seq))

    def on_committed(self, job: Job, event: JobEventType) -> None:
        self.log.append(("dispatcher", event))

    def on_notification(self, job_id: str, seq: int, event: JobEventType | None) -> None:
        self.log.append(("dispatcher notified", event))

    def wake(self) -> None:
        self.log.append(("webhooks", None))


def claimed_at_create() -> tuple[Job, list[JobEvent]]:
    """A job claimed in the transaction that created it: 'created' and 'attempt_started' commit together."""
    job = replace(MemoryStore().add_job(), status=JobState.GENERATING, attempt=1, last_event_seq=2)
    now = datetime.now(UTC)
    created = JobEvent(job.id, 1, JobEventType.CREATED, JobState.PENDING, 0, now)
    started = JobEvent(job.id, 2, JobEventType.ATTEMPT_STARTED, JobState.GENERATING, 1, now)
    return job, [created, started]


def test_watchers_hear_every_event_first_and_the_dispatcher_only_the_jobs_latest() -> None:
    heard = Heard()
    fanout = EventFanout()
    fanout.deliver_to(watchers=heard, runner=heard, webhooks=heard)
    job, events = claimed_at_create()

    for event in events:
        fanout.committed(job, event)

    # The 'created' of a job no longer pending must not wake a claim for it.
    assert heard.log == [
        ("watchers", 1), ("webhooks", None),
        ("watchers", 2), ("dispatcher", JobEventType.ATTEMPT_STARTED), ("webhooks", None),
    ]  # fmt: skip


def test_a_notification_goes_to_the_dispatcher_and_the_webhook_sender() -> None:
    heard = Heard()
    fanout = EventFanout()
    fanout.deliver_to(watchers=heard, runner=heard, webhooks=heard)

    fanout.notified("some-job", 3, JobEventType.CANCEL_REQUESTED)

    assert heard.log == [("dispatcher notified", JobEventType.CANCEL_REQUESTED), ("webhooks", None)]


async def test_a_write_is_in_flight_until_its_events_are_delivered() -> None:
    heard = Heard()
    fanout = EventFanout()
    fanout.deliver_to(watchers=heard)
    job, events = claimed_at_create()
    assert fanout.write_in_flight(job.id) is None

    with fanout.writing(job.id):
        ended = fanout.write_in_flight(job.id)
        assert ended is not None and not ended.is_set()
        with fanout.writing(job.id):  # a second write to the same job at once
            pass
        assert not ended.is_set(), "the first write has not answered yet"
        fanout.committed(job, events[0])

    assert ended.is_set() and heard.log == [("watchers", 1)]
    assert fanout.write_in_flight(job.id) is None
    await asyncio.wait_for(ended.wait(), timeout=1)


def test_a_receiver_that_fails_does_not_keep_the_event_from_the_others() -> None:
    heard = Heard()

    class BrokenWatchers:
        def publish(self, job: Job, event: JobEvent) -> None:
            raise RuntimeError("watcher bug")

    fanout = EventFanout()
    fanout.deliver_to(watchers=BrokenWatchers(), runner=heard, webhooks=heard)
    job, events = claimed_at_create()

    fanout.committed(job, events[-1])  # no raise: the write has committed whatever a receiver does

    assert heard.log == [("dispatcher", JobEventType.ATTEMPT_STARTED), ("webhooks", None)]
