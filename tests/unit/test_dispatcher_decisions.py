"""The dispatcher's decisions, without PostgreSQL: an in-memory store with the SQL's fence rules and a fake generator.

What becomes of a failed attempt (retry or fail), what counts as an attempt, what a cancel does at each point of an
attempt, and what is written of what the generator delivers. tests/integration/test_dispatcher.py proves the same
dispatcher against the real store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Sequence

import pytest

from job_service.dispatcher import Dispatcher, DispatcherConfig
from job_service.domain import (
    GenerationCompleted,
    GenerationEvent,
    GenerationFailure,
    GenerationStarted,
    ImageStored,
    Job,
    JobEventType,
    JobState,
    StoredImage,
)
from job_service.failure_messages import user_message
from job_service.state_changes import StateChange
from tests.support.memory_store import MemoryStore

E = JobEventType
# One step of a fake attempt: an event to yield, a failure to raise, or an asyncio.Event to wait for.
Item = GenerationEvent | BaseException | asyncio.Event


def image(path: str) -> ImageStored:
    return ImageStored(StoredImage(0, f"http://storage/{path}", path, "image/png", 8, 8, 100))


def done(delivered: int, filtered: int = 0) -> GenerationCompleted:
    return GenerationCompleted(delivered, filtered, ["safety"] * filtered)


class FakeGenerator:
    """Plays one scripted step per attempt; an attempt past the script delivers what the job owes and completes."""

    def __init__(self, *steps: Sequence[Item]) -> None:
        self.steps = deque(steps)
        self.opened: list[int] = []
        self.asked: list[int] = []
        self.closed_early: list[int] = []
        self.waiting = asyncio.Event()  # set while a step waits on its asyncio.Event

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        self.opened.append(job.attempt)
        self.asked.append(job.images_owed)
        if self.steps:
            step = self.steps.popleft()
        else:
            images = [image(f"{job.id}/{job.attempt}-{n}.png") for n in range(job.images_owed)]
            step = [GenerationStarted("fake"), *images, done(job.images_owed)]
        finished = False
        try:
            for item in step:
                if isinstance(item, asyncio.Event):
                    self.waiting.set()
                    await item.wait()
                    self.waiting.clear()
                elif isinstance(item, BaseException):
                    finished = True
                    raise item
                else:
                    finished = isinstance(item, GenerationCompleted)  # the reader stops at the completion
                    yield item
            finished = True
        finally:
            if not finished:
                self.closed_early.append(job.attempt)


def dispatcher(store: MemoryStore, generator: FakeGenerator) -> Dispatcher:
    return Dispatcher(
        store,
        generator,
        DispatcherConfig(
            owner="w1",
            max_in_flight=4,
            poll_interval=0.01,
            lease_seconds=30.0,
            retry_base_seconds=0.01,
            retry_max_seconds=0.02,
            write_patience_seconds=1.0,
            handback_seconds=1.0,
            expiry_interval=60.0,
        ),
    )


async def until(store: MemoryStore, job_id: str, check: str, within: float = 5.0) -> Job:
    """The job once `check` holds: "ended" (a terminal state) or an event type it has reached."""
    async with asyncio.timeout(within):
        while True:
            job = store.job(job_id)
            if job.status.terminal if check == "ended" else JobEventType(check) in store.events(job_id):
                return job
            await asyncio.sleep(0.002)


async def run(store: MemoryStore, generator: FakeGenerator, job: Job) -> Job:
    """Runs the dispatcher until the job has ended."""
    worker = dispatcher(store, generator)
    worker.start()
    try:
        return await until(store, job.id, "ended")
    finally:
        await worker.drain(0.1)


def unavailable(*, counts: bool = True) -> GenerationFailure:
    return GenerationFailure("PROVIDER_UNAVAILABLE", "503 from the provider", retryable=True, counts=counts)


# -- retry or fail ---------------------------------------------------------------------------------------------


async def test_a_retryable_failure_with_attempts_left_is_retried_and_the_next_attempt_completes() -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=3)
    generator = FakeGenerator([GenerationStarted("fake"), unavailable()])

    ended = await run(store, generator, job)

    assert (ended.status, ended.attempt, ended.failed_attempts) == (JobState.COMPLETED, 2, 1)
    assert store.events(job.id) == [
        E.CREATED, E.ATTEMPT_STARTED, E.GENERATION_STARTED, E.RETRY_SCHEDULED,
        E.ATTEMPT_STARTED, E.GENERATION_STARTED, E.IMAGE_STORED, E.COMPLETED,
    ]  # fmt: skip
    retry = store.changes(job.id)[1]
    assert (retry.error_code, retry.message) == ("PROVIDER_UNAVAILABLE", user_message("PROVIDER_UNAVAILABLE"))
    assert ended.error_code is None, "the completed job no longer carries the earlier attempt's error"


async def test_a_failure_that_is_not_retryable_fails_the_job_at_once() -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=3)
    blocked = GenerationFailure("PROMPT_BLOCKED", "blocked by the provider", retryable=False)
    generator = FakeGenerator([GenerationStarted("fake"), blocked])

    ended = await run(store, generator, job)

    assert (ended.status, ended.error_code, ended.attempt, ended.failed_attempts) == (
        JobState.FAILED, "PROMPT_BLOCKED", 1, 1,
    )  # fmt: skip
    assert generator.opened == [1]
    assert ended.credits_charged == 0 and ended.credits_reserved == 0


async def test_a_retryable_failure_of_the_last_attempt_fails_the_job() -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=2)
    generator = FakeGenerator([unavailable()], [unavailable()])

    ended = await run(store, generator, job)

    assert (ended.status, ended.error_code, ended.attempt, ended.failed_attempts) == (
        JobState.FAILED, "PROVIDER_UNAVAILABLE", 2, 2,
    )  # fmt: skip
    assert store.events(job.id)[-1] is E.FAILED and store.events(job.id).count(E.RETRY_SCHEDULED) == 1


async def test_a_failure_that_does_not_count_leaves_the_attempts_untouched() -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=1)  # a counted failure would fail it at once
    generator = FakeGenerator(*([unavailable(counts=False)] for _ in range(3)))

    ended = await run(store, generator, job)

    assert (ended.status, ended.attempt, ended.failed_attempts) == (JobState.COMPLETED, 4, 0)
    retries = [change for change in store.changes(job.id) if change.event is E.RETRY_SCHEDULED]
    assert len(retries) == 3 and not any(change.count_failure for change in retries)


# -- what counts as an attempt ---------------------------------------------------------------------------------


async def test_a_crash_and_a_stream_that_ends_without_completing_are_counted_retryable_failures() -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=3)
    generator = FakeGenerator([GenerationStarted("fake"), RuntimeError("a bug")], [GenerationStarted("fake")])

    ended = await run(store, generator, job)

    assert (ended.status, ended.attempt, ended.failed_attempts) == (JobState.COMPLETED, 3, 2)
    retries = [change for change in store.changes(job.id) if change.event is E.RETRY_SCHEDULED]
    assert [(change.error_code, change.count_failure) for change in retries] == [
        ("INTERNAL", True), ("STREAM_ENDED", True),
    ]  # fmt: skip


async def test_an_attempt_asks_only_for_the_images_earlier_attempts_did_not_deliver() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=3, max_attempts=3)
    generator = FakeGenerator([GenerationStarted("fake"), image("a/1-0.png"), image("a/1-1.png"), unavailable()])

    ended = await run(store, generator, job)

    assert generator.asked == [3, 1]
    assert (ended.status, len(ended.images), ended.credits_charged) == (JobState.COMPLETED, 3, 3)
    assert [stored.index for stored in ended.images] == [0, 1, 2]


async def test_a_job_whose_earlier_attempts_delivered_everything_completes_without_the_generator() -> None:
    store = MemoryStore()
    delivered = [image(f"a/1-{n}.png").image for n in range(2)]
    job = store.add_job(sample_count=2, images=delivered, attempt=1, failed_attempts=1)
    generator = FakeGenerator()

    ended = await run(store, generator, job)

    assert generator.opened == []
    assert (ended.status, ended.attempt, len(ended.images), ended.credits_charged) == (JobState.COMPLETED, 2, 2, 2)
    assert store.messages(job.id)[-1] == "2 delivered by earlier attempts"


# -- what is written of what the generator delivers ---------------------------------------------------------------


async def test_images_beyond_what_the_attempt_asked_for_are_not_written() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=2, price_per_image=5)
    extra = [image(f"a/1-{n}.png") for n in range(3)]
    generator = FakeGenerator([GenerationStarted("fake"), *extra, done(3)])

    ended = await run(store, generator, job)

    assert ended.status is JobState.COMPLETED
    assert [stored.storage_path for stored in ended.images] == ["a/1-0.png", "a/1-1.png"]
    assert ended.credits_charged == 10
    assert store.events(job.id).count(E.IMAGE_STORED) == 2


async def test_the_completion_records_what_the_provider_filtered() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=2)
    generator = FakeGenerator([GenerationStarted("fake"), image("a/1-0.png"), done(1, filtered=1)])

    ended = await run(store, generator, job)

    assert (ended.status, ended.filtered_count, ended.filtered_reasons) == (JobState.COMPLETED, 1, ["safety"])
    assert store.messages(job.id)[-1] == "1 delivered, 1 filtered"


async def test_a_write_the_fence_refuses_stops_the_attempt() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=3)
    gate = asyncio.Event()
    hang = asyncio.Event()
    generator = FakeGenerator([GenerationStarted("fake"), image("a/1-0.png"), gate, image("a/1-1.png"), hang])
    worker = dispatcher(store, generator)
    worker.start()
    try:
        await until(store, job.id, "image_stored")
        # This replica stops renewing (it is stuck, say): another one reaps the job and starts attempt 2.
        store.let_lease_run_out(job.id)
        reaped = await store.advance(
            job.id, StateChange.lease_expired("w1 stopped responding"), attempt=1,
            from_states=(JobState.GENERATING,), only_if_lease_expired=True,
        )  # fmt: skip
        assert reaped is not None
        [taken] = await store.claim("w2", 1, 30.0)
        attempt = [task for task in asyncio.all_tasks() if task.get_name() == f"job-{job.id}"]
        gate.set()
        stopped, _ = await asyncio.wait(attempt, timeout=2)
        assert stopped, "the attempt stopped by itself, not at the drain"
    finally:
        await worker.drain(0.1)

    assert generator.closed_early == [1], "the attempt stopped at its first refused write"
    current = store.job(job.id)
    assert (current.status, current.attempt, current.lease_owner) == (JobState.GENERATING, 2, "w2")
    assert [stored.storage_path for stored in current.images] == ["a/1-0.png"]
    assert store.events(job.id)[-2:] == [E.LEASE_EXPIRED, E.ATTEMPT_STARTED] and taken.attempt == 2


# -- what a cancel does ----------------------------------------------------------------------------------------


async def test_a_cancel_before_the_stream_opens_ends_the_job_without_asking_the_generator() -> None:
    store = MemoryStore()
    job = store.add_job()
    generator = FakeGenerator()
    worker = dispatcher(store, generator)
    # Claimed, and the cancel arrives before the attempt has opened its stream.
    original_claim = store.claim

    async def claim_then_cancel(owner: str, limit: int, lease_seconds: float) -> list[Job]:
        claimed = await original_claim(owner, limit, lease_seconds)
        for taken in claimed:
            requested = await store.advance(
                taken.id, StateChange.cancel_requested_by_user(), attempt=taken.attempt,
                from_states=(JobState.GENERATING,),
            )  # fmt: skip
            assert requested is not None
            # As the fan-out delivers it once the attempt runs here (the claim's answer comes first).
            asyncio.get_running_loop().call_soon(worker.on_committed, requested, E.CANCEL_REQUESTED)
        return claimed

    store.claim = claim_then_cancel  # type: ignore[method-assign]
    worker.start()
    try:
        ended = await until(store, job.id, "ended")
    finally:
        await worker.drain(0.1)

    assert generator.opened == []
    assert (ended.status, ended.credits_charged) == (JobState.CANCELLED, 0)
    assert store.messages(job.id)[-1] == "cancelled by the user"


async def test_a_cancel_during_the_stream_stops_it_and_charges_what_was_delivered() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=4, price_per_image=2)
    generator = FakeGenerator([GenerationStarted("fake"), image("a/1-0.png"), asyncio.Event()])
    worker = dispatcher(store, generator)
    worker.start()
    try:
        running = await until(store, job.id, "image_stored")
        await asyncio.wait_for(generator.waiting.wait(), timeout=5)
        requested = await store.advance(
            job.id, StateChange.cancel_requested_by_user(), attempt=running.attempt,
            from_states=(JobState.GENERATING,),
        )  # fmt: skip
        assert requested is not None
        worker.on_committed(requested, E.CANCEL_REQUESTED)
        ended = await until(store, job.id, "ended")
    finally:
        await worker.drain(0.1)

    assert generator.closed_early == [1]
    assert (ended.status, len(ended.images), ended.credits_charged) == (JobState.CANCELLED, 1, 2)
    assert store.events(job.id)[-2:] == [E.CANCEL_REQUESTED, E.CANCELLED]


async def test_a_cancel_after_the_completion_arrived_lets_the_job_complete() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=1)
    generator = FakeGenerator()
    worker = dispatcher(store, generator)

    async def cancel_while_the_completion_is_written(job_id: str, changes: Sequence[StateChange]) -> None:
        if any(change.event is E.COMPLETED for change in changes):
            worker.cancel(job_id, "user")
            await asyncio.sleep(0.01)

    store.before_write = cancel_while_the_completion_is_written
    worker.start()
    try:
        ended = await until(store, job.id, "ended")
        await asyncio.sleep(0.05)  # nothing is written after the completion
    finally:
        await worker.drain(0.1)

    assert (ended.status, ended.credits_charged) == (JobState.COMPLETED, 1)
    assert store.events(job.id)[-1] is E.COMPLETED and E.CANCELLED not in store.events(job.id)
    assert generator.closed_early == []


@pytest.mark.parametrize(
    ("cancel_requested", "failed_attempts", "status", "last_event"),
    [
        (False, 0, JobState.PENDING, E.LEASE_EXPIRED),
        (False, 2, JobState.FAILED, E.FAILED),
        (True, 0, JobState.CANCELLED, E.CANCELLED),
    ],
    ids=["back-to-pending", "last-attempt-fails", "cancel-requested-ends-it"],
)
async def test_a_job_whose_lease_ran_out_is_reaped(
    cancel_requested: bool, failed_attempts: int, status: JobState, last_event: JobEventType
) -> None:
    store = MemoryStore()
    job = store.add_job(max_attempts=3, failed_attempts=failed_attempts)
    [taken] = await store.claim("gone", 1, 30.0)
    if cancel_requested:
        await store.advance(
            job.id, StateChange.cancel_requested_by_user(), attempt=taken.attempt, from_states=(JobState.GENERATING,)
        )
    worker = dispatcher(store, FakeGenerator())
    await worker._reap()
    assert store.job(job.id).status is JobState.GENERATING, "not while the lease still runs"

    store.let_lease_run_out(job.id)
    await worker._reap()

    reaped = store.job(job.id)
    assert (reaped.status, store.events(job.id)[-1]) == (status, last_event)
    assert reaped.failed_attempts == failed_attempts + (0 if cancel_requested else 1)
    if status is JobState.FAILED:
        assert reaped.error_code == "LEASE_EXPIRED"


async def test_a_job_handed_back_at_shutdown_with_a_cancel_requested_ends_cancelled() -> None:
    store = MemoryStore()
    job = store.add_job(sample_count=2)
    generator = FakeGenerator([GenerationStarted("fake"), asyncio.Event()])
    worker = dispatcher(store, generator)
    worker.start()
    await until(store, job.id, "generation_started")
    await asyncio.wait_for(generator.waiting.wait(), timeout=5)
    # The cancel is in the row, but its notification never reached this replica before it began to shut down.
    running = store.job(job.id)
    await store.advance(
        job.id, StateChange.cancel_requested_by_user(), attempt=running.attempt, from_states=(JobState.GENERATING,)
    )

    await worker.drain(0.01)

    ended = store.job(job.id)
    assert store.events(job.id)[-2:] == [E.HANDED_BACK, E.CANCELLED]
    assert (ended.status, ended.failed_attempts, ended.credits_charged) == (JobState.CANCELLED, 0, 0)
    assert generator.closed_early == [1]
