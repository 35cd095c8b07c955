"""The dispatcher against real PostgreSQL with a scripted generator: retries, fencing, leases, hand-back,
and jobs claimed in the transaction that creates them."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from job_service import dispatcher as dispatcher_module
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
    Params,
    StoredImage,
)
from job_service.notifications import JobNotifications
from job_service.state_changes import StateChange
from job_service.store import ClaimAtCreate, CreatedJob, JobStore, create_pool
from tests.support.cluster import events_of, eventually, fresh_database
from tests.support.creates import Create, cancel_unfinished, create_here
from tests.support.ledger import assert_credits_consistent


@dataclass(frozen=True)
class Partial:
    """A step that stores `images` images, then raises `failure`, or completes (`complete`), or else just ends."""

    images: int
    failure: GenerationFailure | None = None
    complete: bool = False


@dataclass
class ScriptedGenerator:
    """One step per attempt: a GenerationFailure to raise, "block" to hang until cancelled, a Partial, or "complete".

    Like GeneratorClient, an attempt asks for the images the job still owes (job.images_owed); `asked` records it.
    """

    script: deque[GenerationFailure | str | Partial] = field(default_factory=deque)
    opened: list[int] = field(default_factory=list)
    closed_early: list[int] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        self.opened.append(job.attempt)
        self.asked.append(job.images_owed)
        step = self.script.popleft() if self.script else "complete"
        finished = False
        try:
            yield GenerationStarted("scripted")
            if isinstance(step, GenerationFailure):
                raise step
            if step == "block":
                await asyncio.Event().wait()
            count = step.images if isinstance(step, Partial) else job.images_owed
            for index in range(count):
                path = f"{job.user_id}/{job.id}/{job.attempt}-{index}.png"
                yield ImageStored(StoredImage(index, f"http://storage/{path}", path, "image/png", 8, 8, 100))
            if isinstance(step, Partial):
                finished = True
                if step.failure is not None:
                    raise step.failure
                if step.complete:
                    yield GenerationCompleted(step.images, 0, [])
                return
            finished = True
            yield GenerationCompleted(job.images_owed, 0, [])
        finally:
            if not finished and not isinstance(step, GenerationFailure):
                self.closed_early.append(job.attempt)


@pytest.fixture(scope="module")
async def dispatcher_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
async def store(dispatcher_db: str) -> AsyncIterator[JobStore]:
    pool = await create_pool(dispatcher_db, min_size=1, max_size=5, statement_cache_size=100)
    yield JobStore(pool)
    await cancel_unfinished(pool)  # nothing may stay active for the next test
    await pool.close()


@pytest.fixture
async def conn(dispatcher_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dispatcher_db)
    yield connection
    await connection.close()


def config(owner: str = "w1", **overrides: float) -> DispatcherConfig:
    values: dict[str, float] = {
        "max_in_flight": 8,
        "poll_interval": 0.05,
        "lease_seconds": 2.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
    }
    values.update(overrides)
    return DispatcherConfig(owner=owner, **values)  # type: ignore[arg-type]


def creating(
    store: JobStore,
    *,
    request_id: str | None = None,
    user: str | None = None,
    sample_count: int = 2,
    max_attempts: int = 3,
) -> Create:
    """CreateJob's write for one new job, as JobManager makes it (with the claim of a slot, or None)."""
    user_id = user or str(uuid.uuid4())

    def create(claim: ClaimAtCreate | None) -> Awaitable[CreatedJob]:
        return store.create_job(
            user_id=user_id,
            prompt="a lighthouse at dusk",
            model="local",
            params=Params(sample_count=sample_count),
            template_id=None,
            request_id=request_id,
            request_hash="test",
            price_per_image=1,
            max_attempts=max_attempts,
            active_limit=10,
            new_user_credits=100,
            claim=claim,
        )

    return create


async def new_job(store: JobStore, *, sample_count: int = 2, max_attempts: int = 5) -> Job:
    return (await creating(store, sample_count=sample_count, max_attempts=max_attempts)(None)).job


async def run_until(store: JobStore, job_id: str, statuses: tuple[JobState, ...], dispatcher: Dispatcher) -> Job:
    dispatcher.start()
    try:
        job = await eventually(
            lambda: store.get_job(job_id), lambda j: j is not None and j.status in statuses, within=30
        )
    finally:
        await dispatcher.drain(1.0)
    assert job is not None and job.status in statuses, job
    return job


async def balance(conn: asyncpg.Connection, user_id: str) -> int:
    value = await conn.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user_id)
    return int(value)


async def test_permanent_failure_fails_at_once_and_releases_the_reservation(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(
        deque([GenerationFailure("PROMPT_BLOCKED", "the prompt was blocked", retryable=False)])
    )
    job = await new_job(store)
    done = await run_until(store, job.id, (JobState.FAILED,), Dispatcher(store, generator, config()))

    assert generator.opened == [1]
    # The user reads the reason's own plain sentence; the generator's text goes to the log only.
    assert (done.error_code, done.error_message) == (
        "PROMPT_BLOCKED",
        "The provider refused the prompt. Rephrase it and try again.",
    )
    assert (done.attempt, done.failed_attempts, done.credits_charged, done.credits_reserved) == (1, 1, 0, 0)
    types = [e["type"] for e in await events_of(conn, job.id)]
    assert types == ["created", "attempt_started", "generation_started", "failed"]
    assert await balance(conn, job.user_id) == 100
    await assert_credits_consistent(conn)


async def test_retryable_failures_retry_until_max_attempts_then_fail_with_the_last_error(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(
        deque(
            [
                GenerationFailure("PROVIDER_UNAVAILABLE", "503 from the provider", retryable=True),
                GenerationFailure("STORAGE_FAILED", "storage answered 502", retryable=True),
                GenerationFailure("RESOURCE_EXHAUSTED", "quota exceeded", retryable=True),
            ]
        )
    )
    job = await new_job(store, max_attempts=3)
    done = await run_until(store, job.id, (JobState.FAILED,), Dispatcher(store, generator, config()))

    assert generator.opened == [1, 2, 3]
    # A reason without a sentence of its own (a bare gRPC code here) gets the generic one, not "quota exceeded".
    assert (done.error_code, done.error_message) == ("RESOURCE_EXHAUSTED", "The images could not be generated.")
    assert (done.failed_attempts, done.credits_charged) == (3, 0)
    events = await events_of(conn, job.id)
    retries = [e for e in events if e["type"] == "retry_scheduled"]
    assert [(e["attempt"], e["detail"]["error_code"]) for e in retries] == [
        (1, "PROVIDER_UNAVAILABLE"),
        (2, "STORAGE_FAILED"),
    ]
    assert all(e["status"] == "pending" for e in retries), "each retry returns the job to PENDING"
    assert [e["type"] for e in events].count("attempt_started") == 3
    assert events[-1]["type"] == "failed"
    await assert_credits_consistent(conn)


async def test_a_retry_is_scheduled_no_earlier_than_the_providers_retry_after(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(
        deque([GenerationFailure("RESOURCE_EXHAUSTED", "slow down", retryable=True, counts=True, retry_after=30.0)])
    )
    job = await new_job(store)
    dispatcher = Dispatcher(store, generator, config())
    dispatcher.start()
    try:
        waiting = await eventually(
            lambda: store.get_job(job.id), lambda j: j is not None and j.error_code is not None, within=30
        )
    finally:
        await dispatcher.drain(1.0)
    assert waiting is not None and waiting.status is JobState.PENDING
    retry_at = await conn.fetchval("SELECT at FROM job_events WHERE job_id = $1 AND type = 'retry_scheduled'", job.id)
    assert (waiting.next_attempt_at - retry_at).total_seconds() >= 30.0 - 0.01
    assert waiting.error_code == "RESOURCE_EXHAUSTED"


async def test_transient_failures_then_success_charges_once_for_the_images_of_the_last_attempt(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(
        deque(
            [
                GenerationFailure("GENERATOR_UNAVAILABLE", "connection refused", retryable=True, counts=False),
                GenerationFailure("PROVIDER_UNAVAILABLE", "503", retryable=True),
            ]
        )
    )
    job = await new_job(store, sample_count=3)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))

    assert (done.attempt, done.failed_attempts) == (3, 1), "an unreachable generator does not use up an attempt"
    assert [image.storage_path.split("/")[-1] for image in done.images] == ["3-0.png", "3-1.png", "3-2.png"]
    assert done.credits_charged == 3
    assert await balance(conn, job.user_id) == 97
    await assert_credits_consistent(conn)


async def test_a_retry_keeps_the_images_a_failed_attempt_delivered_and_asks_only_for_the_rest(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(deque([Partial(2, GenerationFailure("PROVIDER_UNAVAILABLE", "503", retryable=True))]))
    job = await new_job(store, sample_count=4)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))

    assert generator.asked == [4, 2]
    assert [image.storage_path.split("/")[-1] for image in done.images] == ["1-0.png", "1-1.png", "2-0.png", "2-1.png"]
    assert [image.index for image in done.images] == [0, 1, 2, 3], "one index per image of the job, in order"
    assert (done.credits_charged, done.error_code, done.error_message) == (4, None, None)
    capture = await conn.fetchrow(
        "SELECT amount, images FROM credit_ledger WHERE job_id = $1 AND kind = 'capture'", job.id
    )
    assert (capture["amount"], capture["images"]) == (-4, 4)
    assert await balance(conn, job.user_id) == 96
    await assert_credits_consistent(conn)


async def test_a_job_whose_earlier_attempt_delivered_every_image_completes_without_asking_for_more(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    # Both images are stored, then the stream ends before the completion: a retryable failure.
    generator = ScriptedGenerator(deque([Partial(2, None)]))
    job = await new_job(store, sample_count=2)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))

    assert generator.opened == [1], "nothing was owed: the generator was not asked again"
    assert (done.attempt, len(done.images), done.credits_charged) == (2, 2, 2)
    assert (done.error_code, done.error_message) == (None, None)
    events = await events_of(conn, job.id)
    assert [(e["type"], e["attempt"]) for e in events][-2:] == [("attempt_started", 2), ("completed", 2)]
    await assert_credits_consistent(conn)


async def test_images_past_what_an_attempt_asked_for_are_neither_kept_nor_charged(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    # The provider answers three images where two were asked for.
    generator = ScriptedGenerator(deque([Partial(3, complete=True)]))
    job = await new_job(store, sample_count=2)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))

    assert [image.storage_path.split("/")[-1] for image in done.images] == ["1-0.png", "1-1.png"]
    assert done.credits_charged == 2
    capture = await conn.fetchval("SELECT images FROM credit_ledger WHERE job_id = $1 AND kind = 'capture'", job.id)
    assert capture == 2
    await assert_credits_consistent(conn)


async def test_a_cancel_while_generating_charges_the_images_stored_before_it_and_none_after(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    job = await new_job(store, sample_count=4)
    [claimed] = await store.claim("w1", 1, 30.0)
    assert claimed.id == job.id
    generating = (JobState.GENERATING,)
    paths = [f"{job.user_id}/{job.id}/1-{index}.png" for index in range(4)]
    images = [StoredImage(i, f"http://storage/{p}", p, "image/png", 8, 8, 100) for i, p in enumerate(paths)]
    for image in images[:2]:
        stored = await store.advance(
            job.id, StateChange.image_stored(image), attempt=claimed.attempt, from_states=generating
        )
        assert stored is not None
    cancelled = await store.advance(
        job.id, StateChange(event=JobEventType.CANCELLED, to=JobState.CANCELLED), attempt=claimed.attempt,
        from_states=generating,
    )  # fmt: skip
    assert cancelled is not None and (cancelled.status, cancelled.credits_charged) == (JobState.CANCELLED, 2)
    # The attempt's next image arrives after the cancel: fenced out, neither kept nor charged.
    late = await store.advance(
        job.id, StateChange.image_stored(images[2]), attempt=claimed.attempt, from_states=generating
    )
    assert late is None
    final = await store.get_job(job.id)
    assert final is not None and [i.storage_path for i in final.images] == paths[:2]
    assert final.credits_charged == 2
    capture = await conn.fetchrow(
        "SELECT amount, images FROM credit_ledger WHERE job_id = $1 AND kind = 'capture'", job.id
    )
    assert (capture["amount"], capture["images"]) == (-2, 2)
    await assert_credits_consistent(conn)


async def test_a_job_completed_after_a_failed_attempt_no_longer_carries_its_error(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(
        deque([GenerationFailure("PROVIDER_UNAVAILABLE", "503 from the provider", retryable=True)])
    )
    job = await new_job(store, sample_count=1)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))

    assert done.attempt == 2
    # The row itself, as a Realtime subscriber reads it, not only what GetJob chooses to show.
    row = await conn.fetchrow("SELECT status, error_code, error_message FROM generation_jobs WHERE id = $1", job.id)
    assert (row["status"], row["error_code"], row["error_message"]) == ("completed", None, None)
    retry = [e for e in await events_of(conn, job.id) if e["type"] == "retry_scheduled"]
    assert [e["detail"]["error_code"] for e in retry] == ["PROVIDER_UNAVAILABLE"], "the history keeps the error"


async def test_a_stale_attempt_can_neither_complete_nor_charge(store: JobStore, conn: asyncpg.Connection) -> None:
    job = await new_job(store, sample_count=1)
    [first] = await store.claim("w1", 1, 30.0)
    # w1 goes quiet; its lease runs out and the job is reaped and claimed again by w2.
    await conn.execute("UPDATE generation_jobs SET lease_expires_at = now() - interval '1 s' WHERE id = $1", job.id)
    reaped = await store.advance(
        job.id,
        StateChange(event=JobEventType.LEASE_EXPIRED, to=JobState.PENDING, count_failure=True),
        attempt=first.attempt,
        from_states=(JobState.GENERATING,),
        only_if_lease_expired=True,
    )
    assert reaped is not None and reaped.status is JobState.PENDING
    [second] = await store.claim("w2", 1, 30.0)
    assert second.attempt == first.attempt + 1

    path = f"{job.user_id}/{job.id}/1-0.png"
    image = StoredImage(0, f"http://storage/{path}", path, "image/png", 8, 8, 100)
    for change in (
        StateChange(event=JobEventType.IMAGE_STORED, image=image),
        StateChange(event=JobEventType.COMPLETED, to=JobState.COMPLETED),
        StateChange(event=JobEventType.FAILED, to=JobState.FAILED),
    ):
        stale = await store.advance(job.id, change, attempt=first.attempt, from_states=(JobState.GENERATING,))
        assert stale is None, f"{change.event} of the stale attempt landed"
    # Nor can the old owner renew a lease it no longer holds.
    assert await store.renew_leases("w1", [(job.id, first.attempt)], 30.0) == {}

    current = await store.get_job(job.id)
    assert current is not None and (current.status, current.attempt, current.images) == (
        JobState.GENERATING,
        second.attempt,
        [],
    )
    assert await conn.fetchval("SELECT count(*) FROM credit_ledger WHERE job_id = $1 AND kind = 'capture'", job.id) == 0
    await assert_credits_consistent(conn)


async def test_a_replica_that_loses_its_lease_abandons_the_stream(store: JobStore, conn: asyncpg.Connection) -> None:
    generator = ScriptedGenerator(deque(["block"]))
    dispatcher = Dispatcher(store, generator, config(lease_seconds=0.6))
    job = await new_job(store)
    dispatcher.start()
    try:
        await eventually(lambda: asyncio.sleep(0, generator.opened), lambda opened: opened == [1], within=10)
        # Another replica took the job over (as if this one had been unreachable past its lease).
        await conn.execute("UPDATE generation_jobs SET attempt = attempt + 1, lease_owner = 'w2' WHERE id = $1", job.id)
        closed = await eventually(
            lambda: asyncio.sleep(0, generator.closed_early), lambda closed: closed == [1], within=10
        )
        assert closed == [1], "the stream of the lost attempt was closed"
        assert dispatcher.in_flight == 0
    finally:
        await dispatcher.drain(0.5)
    current = await store.get_job(job.id)
    assert current is not None and (current.status, current.lease_owner) == (JobState.GENERATING, "w2")


async def test_drain_hands_back_what_outlives_the_grace_period(store: JobStore, conn: asyncpg.Connection) -> None:
    generator = ScriptedGenerator(deque(["block", "block"]))
    dispatcher = Dispatcher(store, generator, config(lease_seconds=30.0))
    jobs = [await new_job(store), await new_job(store)]
    dispatcher.start()
    await eventually(lambda: asyncio.sleep(0, len(generator.opened)), lambda n: n == 2, within=10)
    await dispatcher.drain(0.2)

    assert sorted(generator.closed_early) == [1, 1]
    for job in jobs:
        current = await store.get_job(job.id)
        assert current is not None
        assert (current.status, current.lease_owner, current.failed_attempts) == (JobState.PENDING, None, 0)
        last = (await events_of(conn, job.id))[-1]
        assert last["type"] == "handed_back" and "shutdown" in last["detail"]["message"]
    # Handed back jobs are due at once: another replica picks them up without waiting.
    assert sorted(j.id for j in await store.claim("w2", 10, 30.0)) == sorted(j.id for j in jobs)


def tasks_of(job_id: str) -> list[asyncio.Task[Any]]:
    """The dispatcher's tasks for a job: its attempt and the reader of its Generate stream."""
    return [task for task in asyncio.all_tasks() if task.get_name() in (f"job-{job_id}", f"generate-{job_id}")]


async def test_a_drain_whose_hand_back_the_database_refuses_leaves_nothing_running(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database goes away as the drain begins, so the hand-back cannot land; its write would retry for
    # write_patience_seconds (60 s), past the drain and into the pool that JobApp.stop closes right after.
    generator = ScriptedGenerator(deque(["block"]))
    dispatcher = Dispatcher(store, generator, config(lease_seconds=30.0, handback_seconds=0.3))
    job = await new_job(store)
    dispatcher.start()
    await eventually(lambda: asyncio.sleep(0, len(generator.opened)), lambda n: n == 1, within=10)
    tried: list[object] = []

    async def refused(_job_id: str, change: StateChange, **_fence: object) -> None:
        tried.append(change.event)
        raise asyncpg.InterfaceError("pool is closed")

    monkeypatch.setattr(store, "advance", refused)
    await dispatcher.drain(0.1)

    assert tried and tried[0] is JobEventType.HANDED_BACK, tried
    assert all(task.done() for task in tasks_of(job.id)), "nothing of the drained dispatcher is still running"
    retries = len(tried)
    await asyncio.sleep(0.5)
    assert len(tried) == retries, "no write after the drain"
    monkeypatch.undo()
    current = await store.get_job(job.id)
    assert current is not None and (current.status, current.lease_owner) == (JobState.GENERATING, "w1"), (
        "the job is left to its lease, as after a crash"
    )


async def test_a_cancel_requested_before_a_failed_attempt_ends_the_job_instead_of_retrying(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    gate = asyncio.Event()

    class GatedFailure(ScriptedGenerator):
        async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
            yield GenerationStarted("scripted")
            await gate.wait()
            raise GenerationFailure("PROVIDER_UNAVAILABLE", "503", retryable=True)

    job = await new_job(store)
    # No NOTIFY reaches this dispatcher, so the cancel meets the attempt only when it has failed.
    dispatcher = Dispatcher(store, GatedFailure(), config(lease_seconds=30.0))
    dispatcher.start()
    try:
        running = await eventually(
            lambda: store.get_job(job.id), lambda j: j is not None and j.last_event_seq >= 3, within=10
        )
        assert running is not None
        await store.advance(
            job.id,
            StateChange(event=JobEventType.CANCEL_REQUESTED, cancel_requested=True),
            attempt=running.attempt,
            from_states=(JobState.GENERATING,),
        )
        gate.set()
        done = await eventually(lambda: store.get_job(job.id), lambda j: j is not None and j.status.terminal, within=10)
    finally:
        await dispatcher.drain(0.5)
    assert done is not None and done.status is JobState.CANCELLED
    assert await balance(conn, job.user_id) == 100
    await assert_credits_consistent(conn)


async def test_events_waiting_together_are_written_in_one_transaction(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    """The scripted stream delivers all its events at once: one commit for all of them, each its own event row."""
    generator = ScriptedGenerator()
    job = await new_job(store, sample_count=3)
    done = await run_until(store, job.id, (JobState.COMPLETED,), Dispatcher(store, generator, config()))
    assert len(done.images) == 3 and done.credits_charged == 3

    rows = await conn.fetch(
        "SELECT seq, type, at, xmin::text AS tx FROM job_events WHERE job_id = $1 AND seq > 2 ORDER BY seq", job.id
    )
    assert [r["type"] for r in rows] == ["generation_started"] + ["image_stored"] * 3 + ["completed"]
    assert [r["seq"] for r in rows] == [3, 4, 5, 6, 7]
    assert len({r["tx"] for r in rows}) == 1, "one transaction"
    assert len({r["at"] for r in rows}) == 1, "one transaction start time"
    await assert_credits_consistent(conn)


@dataclass
class SpreadImagesGenerator:
    """Starts, stores the first image, then the others `gap` seconds later, then completes."""

    gap: float

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        yield GenerationStarted("spread")
        for index in range(job.params.sample_count):
            if index == 1:
                await asyncio.sleep(self.gap)
            path = f"{job.user_id}/{job.id}/{job.attempt}-{index}.png"
            yield ImageStored(StoredImage(index, f"http://storage/{path}", path, "image/png", 8, 8, 100))
        yield GenerationCompleted(job.params.sample_count, 0, [])


async def transactions_of(conn: asyncpg.Connection, job_id: str) -> list[list[str]]:
    """The job's events after its start, grouped by the transaction that wrote them, in order."""
    rows = await conn.fetch(
        "SELECT type, xmin::text AS tx FROM job_events WHERE job_id = $1 AND seq > 2 ORDER BY seq", job_id
    )
    groups: list[list[str]] = []
    for i, row in enumerate(rows):
        if i == 0 or row["tx"] != rows[i - 1]["tx"]:
            groups.append([])
        groups[-1].append(row["type"])
    return groups


async def test_images_that_arrive_a_moment_apart_share_one_transaction_with_the_completion(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    job = await new_job(store, sample_count=3)
    dispatcher = Dispatcher(store, SpreadImagesGenerator(gap=0.001), config(image_linger_seconds=0.05))
    done = await run_until(store, job.id, (JobState.COMPLETED,), dispatcher)
    assert len(done.images) == 3 and done.credits_charged == 3
    groups = await transactions_of(conn, job.id)
    # (GENERATION_STARTED, which comes with the first image, may share it too.)
    assert groups[-1][-4:] == ["image_stored"] * 3 + ["completed"], groups
    assert sum(g.count("image_stored") for g in groups[:-1]) == 0, groups
    await assert_credits_consistent(conn)


async def test_an_image_whose_neighbours_take_longer_than_the_linger_is_written_without_them(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    job = await new_job(store, sample_count=3)
    dispatcher = Dispatcher(store, SpreadImagesGenerator(gap=0.5), config(image_linger_seconds=0.01))
    await run_until(store, job.id, (JobState.COMPLETED,), dispatcher)
    groups = await transactions_of(conn, job.id)
    first_image = next(g for g in groups if "image_stored" in g)
    assert first_image[-1] == "image_stored" and first_image.count("image_stored") == 1, groups
    assert groups[-1] == ["image_stored"] * 2 + ["completed"], groups


async def test_a_batch_stops_at_the_first_event_the_fence_refuses(store: JobStore, conn: asyncpg.Connection) -> None:
    job = await new_job(store, sample_count=2)
    [claimed] = await store.claim("w1", 1, 30.0)
    paths = [f"{job.user_id}/{job.id}/1-{index}.png" for index in range(2)]
    images = [StoredImage(i, f"http://storage/{p}", p, "image/png", 8, 8, 100) for i, p in enumerate(paths)]
    generating = (JobState.GENERATING,)

    # The wrong attempt: nothing is written.
    stale = await store.advance_batch(
        job.id,
        [StateChange(event=JobEventType.IMAGE_STORED, image=images[0])],
        attempt=claimed.attempt + 1,
        from_states=generating,
    )
    assert stale == []
    # An event after the completion is refused by the fence; the batch stops there and keeps what came before.
    written = await store.advance_batch(
        job.id,
        [
            StateChange(event=JobEventType.IMAGE_STORED, image=images[0]),
            StateChange(event=JobEventType.COMPLETED, to=JobState.COMPLETED, filtered_count=1, filtered_reasons=("x",)),
            StateChange(event=JobEventType.IMAGE_STORED, image=images[1]),
        ],
        attempt=claimed.attempt,
        from_states=generating,
    )
    assert [j.status for j in written] == [JobState.GENERATING, JobState.COMPLETED]
    assert [j.last_event_seq for j in written] == [3, 4]
    final = await store.get_job(job.id)
    assert final is not None and [i.storage_path for i in final.images] == paths[:1]
    assert (final.filtered_count, final.filtered_reasons, final.credits_charged) == (1, ["x"], 1)
    assert [e["type"] for e in await events_of(conn, job.id)] == [
        "created",
        "attempt_started",
        "image_stored",
        "completed",
    ]
    await assert_credits_consistent(conn)


async def test_a_batch_of_an_attempt_that_lost_the_job_writes_nothing(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    class TakenOverMidStream(ScriptedGenerator):
        async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
            yield GenerationStarted("scripted")
            # Written alone; then another replica takes the job over before the rest arrives together.
            await eventually(
                lambda: events_of(conn, job.id), lambda events: events[-1]["type"] == "generation_started", within=10
            )
            await conn.execute(
                "UPDATE generation_jobs SET attempt = attempt + 1, lease_owner = 'w2' WHERE id = $1", job.id
            )
            for index in range(job.params.sample_count):
                path = f"{job.user_id}/{job.id}/{job.attempt}-{index}.png"
                yield ImageStored(StoredImage(index, f"http://storage/{path}", path, "image/png", 8, 8, 100))
            yield GenerationCompleted(job.params.sample_count, 0, [])
            self.closed_early.append(-1)  # never reached: the stream is closed after the fenced write

    generator = TakenOverMidStream()
    dispatcher = Dispatcher(store, generator, config(lease_seconds=30.0))
    job = await new_job(store)
    dispatcher.start()
    try:
        await eventually(lambda: store.get_job(job.id), lambda j: j is not None and j.lease_owner == "w2", within=10)
        await asyncio.sleep(0.2)
        await eventually(lambda: asyncio.sleep(0, dispatcher.in_flight), lambda n: n == 0, within=10)
    finally:
        await dispatcher.drain(0.5)
    current = await store.get_job(job.id)
    assert current is not None and (current.status, current.images, current.lease_owner) == (
        JobState.GENERATING,
        [],
        "w2",
    )
    assert [e["type"] for e in await events_of(conn, job.id)] == ["created", "attempt_started", "generation_started"]
    assert generator.closed_early == []


def count_claims(store: JobStore) -> list[tuple[int, int]]:
    """(jobs asked for, jobs claimed) of every claim made through `store` from now on."""
    claims: list[tuple[int, int]] = []
    claim = store.claim

    async def counted(owner: str, limit: int, lease_seconds: float) -> list[Job]:
        jobs = await claim(owner, limit, lease_seconds)
        claims.append((limit, len(jobs)))
        return jobs

    store.claim = counted  # type: ignore[method-assign]
    return claims


async def run_to_the_end(store: JobStore, jobs: list[Job], dispatcher: Dispatcher) -> None:
    """Runs the dispatcher until every one of `jobs` has ended, and a moment longer (for claims it would still make)."""
    dispatcher.start()
    try:
        for job in jobs:
            await eventually(
                lambda job=job: store.get_job(job.id), lambda j: j is not None and j.status.terminal, within=30
            )
        await asyncio.sleep(0.2)
    finally:
        await dispatcher.drain(1.0)


async def test_a_backlog_is_claimed_in_growing_rounds_and_jobs_that_end_claim_nothing(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    jobs = [await new_job(store, sample_count=1) for _ in range(100)]
    claims = count_claims(store)
    # No poll within the test: every claim after the first is one the dispatcher chose to make.
    await run_to_the_end(
        store, jobs, Dispatcher(store, ScriptedGenerator(), config(max_in_flight=1000, poll_interval=60.0))
    )
    assert claims == [(32, 32), (64, 64), (128, 4), (32, 0)], (
        "full claims double until the backlog is gone; a hundred jobs ending wake no empty claim"
    )
    await assert_credits_consistent(conn)


async def test_a_full_replica_claims_again_as_soon_as_a_job_ends(store: JobStore, conn: asyncpg.Connection) -> None:
    jobs = [await new_job(store, sample_count=1) for _ in range(6)]
    claims = count_claims(store)
    await run_to_the_end(
        store, jobs, Dispatcher(store, ScriptedGenerator(), config(max_in_flight=2, poll_interval=60.0))
    )
    assert all(asked <= 2 for asked, _ in claims), claims
    assert sum(claimed for _, claimed in claims) == 6
    await assert_credits_consistent(conn)


class _Warnings:
    """Stands in for the dispatcher module's logger: keeps the warnings, drops the rest.

    The logger is the module's, so it hears every Dispatcher in this process (the tests share one event loop);
    `about(job_id)` keeps what concerns that job, or no job in particular.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    def info(self, event: str, **_fields: object) -> None:
        pass

    def exception(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    def about(self, job_id: str) -> list[str]:
        return [event for event, fields in self.events if fields.get("job_id", job_id) == job_id]


async def test_a_job_that_completes_just_before_a_lease_renewal_is_not_reported_as_a_lost_lease(
    store: JobStore, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings = _Warnings()
    monkeypatch.setattr(dispatcher_module, "log", warnings)
    renewed = asyncio.Event()
    renew_leases = store.renew_leases

    async def renew_and_tell(owner: str, held: Sequence[tuple[str, int]], lease_seconds: float) -> dict[str, bool]:
        still = await renew_leases(owner, held, lease_seconds)
        if held:
            renewed.set()
        return still

    advance_batch = store.advance_batch

    async def complete_then_wait_for_a_renewal(job_id: str, changes: Sequence[StateChange], **kwargs: Any) -> list[Job]:
        # The completion has landed, but its attempt is still in flight when the next renewal comes round.
        written = await advance_batch(job_id, changes, **kwargs)
        if written and written[-1].status is JobState.COMPLETED:
            renewed.clear()
            await renewed.wait()
        return written

    store.renew_leases = renew_and_tell  # type: ignore[method-assign]
    store.advance_batch = complete_then_wait_for_a_renewal  # type: ignore[method-assign]
    job = await new_job(store, sample_count=2)
    # Started, both images and the completion come at once: one batch.
    await run_to_the_end(store, [job], Dispatcher(store, ScriptedGenerator(), config(lease_seconds=0.3)))

    assert renewed.is_set(), "a renewal ran while the completed attempt was still in flight"
    assert warnings.about(job.id) == []
    current = await store.get_job(job.id)
    assert current is not None and current.status is JobState.COMPLETED
    await assert_credits_consistent(conn)


# -- A job claimed in the transaction that creates it (Dispatcher.reserve, settle) ----------------------
# A replica with room claims the job it creates in the create's own transaction and runs it without a claim; a
# full or draining replica, or an idempotent replay, claims nothing as it creates. (A create whose caller went away
# still runs its job here: JobManager's guarantee, tested in test_create_and_claim.)


def event_rows(events: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(e["seq"], e["type"], e["status"], e["attempt"]) for e in events]


async def test_a_job_created_with_room_is_claimed_in_its_create_and_runs_without_a_claim(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    dispatcher = Dispatcher(store, ScriptedGenerator(), config(max_in_flight=4, poll_interval=60.0))
    claims = count_claims(store)
    job, created = await create_here(dispatcher, creating(store))

    assert created and (job.status, job.attempt, job.lease_owner) == (JobState.GENERATING, 1, "w1")
    assert dispatcher.in_flight == 1, "the create handed its job to the dispatcher"
    await run_to_the_end(store, [job], dispatcher)

    assert sum(claimed for _, claimed in claims) == 0, f"no claim brought the job: {claims}"
    assert event_rows(await events_of(conn, job.id)) == [
        (1, "created", "pending", 0),
        (2, "attempt_started", "generating", 1),
        (3, "generation_started", "generating", 1),
        (4, "image_stored", "generating", 1),
        (5, "image_stored", "generating", 1),
        (6, "completed", "completed", 1),
    ]
    done = await store.get_job(job.id)
    assert done is not None and (done.status, done.credits_charged) == (JobState.COMPLETED, 2)
    await assert_credits_consistent(conn)


async def test_a_full_replica_creates_the_job_pending_and_claims_it_once_it_has_room(
    store: JobStore, conn: asyncpg.Connection
) -> None:
    generator = ScriptedGenerator(deque(["block"]))
    dispatcher = Dispatcher(store, generator, config(max_in_flight=1, poll_interval=60.0))
    blocking, _ = await create_here(dispatcher, creating(store))
    waiting, _ = await create_here(dispatcher, creating(store))

    assert (blocking.status, waiting.status) == (JobState.GENERATING, JobState.PENDING)
    assert waiting.attempt == 0 and waiting.lease_owner is None
    dispatcher.start()
    try:
        await eventually(lambda: asyncio.sleep(0, generator.opened), lambda opened: opened == [1], within=10)
        dispatcher.cancel(blocking.id, "user")  # its room goes to the waiting job
        await eventually(
            lambda: store.get_job(waiting.id), lambda j: j is not None and j.status is JobState.COMPLETED, within=10
        )
    finally:
        await dispatcher.drain(1.0)
    assert [e["type"] for e in await events_of(conn, waiting.id)][:2] == ["created", "attempt_started"]
    await assert_credits_consistent(conn)


async def test_a_draining_replica_claims_nothing_as_it_creates(store: JobStore, conn: asyncpg.Connection) -> None:
    dispatcher = Dispatcher(store, ScriptedGenerator(), config(max_in_flight=4))
    await dispatcher.drain(0.1)
    job, created = await create_here(dispatcher, creating(store))

    assert created and (job.status, job.attempt) == (JobState.PENDING, 0)
    assert dispatcher.in_flight == 0
    assert event_rows(await events_of(conn, job.id)) == [(1, "created", "pending", 0)]


async def test_a_replayed_create_claims_nothing_more(store: JobStore, conn: asyncpg.Connection) -> None:
    generator = ScriptedGenerator(deque(["block"]))
    dispatcher = Dispatcher(store, generator, config(max_in_flight=4, poll_interval=60.0))
    create = creating(store, request_id="checkout-1")
    first, first_created = await create_here(dispatcher, create)
    again, again_created = await create_here(dispatcher, create)
    try:
        assert (first_created, again_created) == (True, False)
        assert again.id == first.id and (again.status, again.attempt) == (JobState.GENERATING, 1)
        assert dispatcher.in_flight == 1, "one attempt runs"
        await eventually(lambda: asyncio.sleep(0, generator.opened), lambda opened: opened == [1], within=10)
    finally:
        await dispatcher.drain(0.1)  # hands the blocked attempt back
    types = [e["type"] for e in await events_of(conn, first.id)]
    assert types.count("attempt_started") == 1 and types[0] == "created"
    await assert_credits_consistent(conn)


@dataclass
class GatedGenerator:
    """Starts, then waits for `gate` before storing every image and completing; `closed_early` as above."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    opened: list[str] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        self.opened.append(job.id)
        finished = False
        try:
            yield GenerationStarted("gated")
            await self.gate.wait()
            for index in range(job.params.sample_count):
                path = f"{job.user_id}/{job.id}/{job.attempt}-{index}.png"
                yield ImageStored(StoredImage(index, f"http://storage/{path}", path, "image/png", 8, 8, 100))
            finished = True
            yield GenerationCompleted(job.params.sample_count, 0, [])
        finally:
            if not finished:
                self.closed_early.append(job.id)


async def test_a_forged_cancel_notification_changes_nothing_and_a_real_cancel_still_stops_at_once(
    store: JobStore, conn: asyncpg.Connection, dispatcher_db: str
) -> None:
    # Any database login may NOTIFY on the jobs channel. The dispatcher hears of cancels only through
    # its LISTEN connection here (the lease is long: the renewal does not see them within the test).
    generator = GatedGenerator()
    dispatcher = Dispatcher(store, generator, config(lease_seconds=60.0))
    notifications = JobNotifications(dispatcher_db, store, on_event=dispatcher.on_notification)
    await notifications.start()
    forged, real = await new_job(store, sample_count=3), await new_job(store, sample_count=1)
    try:
        await asyncio.wait_for(notifications.connected.wait(), timeout=10)
        dispatcher.start()
        await eventually(lambda: asyncio.sleep(0, len(generator.opened)), lambda n: n == 2, within=10)

        await conn.execute("SELECT pg_notify('imagegen_jobs', $1)", f"{forged.id}:999:cancel_requested")
        running = await store.get_job(real.id)
        assert running is not None
        await store.advance(
            real.id,
            StateChange(event=JobEventType.CANCEL_REQUESTED, cancel_requested=True),
            attempt=running.attempt,
            from_states=(JobState.GENERATING,),
        )
        # The real cancel stops its attempt promptly (long before any lease renewal would see it)...
        cancelled = await eventually(
            lambda: store.get_job(real.id), lambda j: j is not None and j.status.terminal, within=5
        )
        assert cancelled is not None and cancelled.status is JobState.CANCELLED
        # ...while the attempt named in the forged notification (sent first, so heard first) runs on.
        assert generator.closed_early == [real.id]
        generator.gate.set()
        done = await eventually(
            lambda: store.get_job(forged.id), lambda j: j is not None and j.status.terminal, within=10
        )
    finally:
        await dispatcher.drain(0.5)
        await notifications.stop()
    assert done is not None and done.status is JobState.COMPLETED
    assert len(done.images) == 3 and not done.cancel_requested
    assert await balance(conn, forged.user_id) == 100 - 3
    await assert_credits_consistent(conn)
