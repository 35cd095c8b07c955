"""Creates that arrive together share one database call, and each gets exactly the answer it would alone.

Sixty creates at once for a handful of users: the first few go alone, the rest in batches (counted), and
the credit, active-job and request_id rules hold per user exactly as they do one create at a time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from imagegen_common.errors import ServiceError
from job_service.domain import Job, JobEvent, JobEventType, JobState, Params
from job_service.fanout import EventFanout
from job_service.store import ClaimAtCreate, CreatedJob, JobStore, _NewJob, create_pool
from tests.support.cluster import fresh_database
from tests.support.ledger import assert_credits_consistent


class _Recorder:
    """The local watchers, as the fan-out sees them: records every event it is given."""

    def __init__(self) -> None:
        self.heard: list[tuple[Job, JobEvent]] = []
        self.fanout = EventFanout()
        self.fanout.deliver_to(watchers=self)

    def publish(self, job: Job, event: JobEvent) -> None:
        self.heard.append((job, event))


class CountingStore(JobStore):
    """Counts the batched calls, so the test knows the batch path is the one it checked."""

    batches: list[int]
    heard: list[tuple[Job, JobEvent]]  # every event the store handed its fan-out

    async def _create_many(self, batch: list[_NewJob]) -> list[CreatedJob | BaseException]:
        self.batches.append(len(batch))
        return await super()._create_many(batch)


@pytest.fixture
async def store(pg_server: str) -> AsyncIterator[tuple[CountingStore, str]]:
    async with fresh_database(pg_server) as url:
        pool = await create_pool(url, min_size=1, max_size=4, statement_cache_size=100)
        recorder = _Recorder()
        counting = CountingStore(pool, recorder.fanout)
        counting.batches = []
        counting.heard = recorder.heard
        yield counting, url
        await pool.close()


def create(
    store: JobStore,
    user: str,
    *,
    request_id: str | None = None,
    prompt: str = "a",
    limit: int = 100,
    max_attempts: int = 3,
    claim: ClaimAtCreate | None = None,
    priority: int | None = None,
) -> Any:
    return store.create_job(
        user_id=user,
        prompt=prompt,
        model="local",
        params=Params(sample_count=2),
        template_id=None,
        request_id=request_id,
        request_hash=prompt,
        price_per_image=1,
        max_attempts=max_attempts,
        active_limit=limit,
        new_user_credits=0,
        claim=claim,
        priority=priority,
    )


async def test_batched_creates_follow_every_rule_per_user(store: tuple[CountingStore, str]) -> None:
    jobs, url = store
    poor = [str(uuid.uuid4()) for _ in range(8)]  # 7 credits: three jobs of 2 images, then too few
    capped = str(uuid.uuid4())  # plenty of credits, at most two active jobs
    replaying = str(uuid.uuid4())  # the same request_id three times, once with a different request
    for user in poor:
        await jobs.grant_credits(user, 7, "test", premium=None, new_user_credits=0)
    await jobs.grant_credits(capped, 100, "test", premium=None, new_user_credits=0)
    await jobs.grant_credits(replaying, 100, "test", premium=None, new_user_credits=0)

    calls: list[tuple[str, Any]] = [(user, create(jobs, user, prompt=f"p{i}")) for i in range(5) for user in poor]
    calls += [(capped, create(jobs, capped, prompt=f"c{i}", limit=2)) for i in range(5)]
    calls += [
        (replaying, create(jobs, replaying, request_id="r1", prompt="same")),
        (replaying, create(jobs, replaying, request_id="r1", prompt="same")),
        (replaying, create(jobs, replaying, request_id="r1", prompt="different")),
    ]
    outcomes = await asyncio.gather(*(call for _, call in calls), return_exceptions=True)

    assert sum(jobs.batches) >= 30, f"the batch path was hardly used: {jobs.batches}"
    assert max(jobs.batches) > 1
    made: Counter[str] = Counter()
    refused: Counter[tuple[str, str]] = Counter()
    for (user, _), outcome in zip(calls, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            refused[user, outcome.reason] += 1
        else:
            assert not isinstance(outcome, BaseException), repr(outcome)
            job, created = outcome.job, outcome.created
            assert job.user_id == user and job.credits_reserved == 2
            made[user] += created
    for user in poor:
        assert made[user] == 3 and refused[user, "INSUFFICIENT_CREDITS"] == 2
    assert made[capped] == 2 and refused[capped, "TOO_MANY_ACTIVE_JOBS"] == 3
    assert made[replaying] == 1 and refused[replaying, "REQUEST_ID_REUSED"] == 1
    replays = [o for (u, _), o in zip(calls, outcomes, strict=True) if u == replaying and isinstance(o, CreatedJob)]
    assert len(replays) == 2 and replays[0].job.id == replays[1].job.id  # the replay answers the same job

    conn = await asyncpg.connect(url)
    try:
        balances = {str(r["user_id"]): r["balance"] for r in await conn.fetch("SELECT * FROM credit_accounts")}
        assert all(balances[user] == 1 for user in poor)
        assert balances[capped] == 96 and balances[replaying] == 98
        assert await conn.fetchval("SELECT count(*) FROM generation_jobs") == 8 * 3 + 2 + 1
        events = await conn.fetchval("SELECT count(*) FROM job_events WHERE type = 'created'")
        assert events == 8 * 3 + 2 + 1
        await assert_credits_consistent(conn)
    finally:
        await conn.close()


async def test_a_create_that_breaks_its_batch_fails_alone(store: tuple[CountingStore, str]) -> None:
    """Any fault but the create rules aborts the whole batched call; the others are then made one by one."""
    jobs, url = store
    users = [str(uuid.uuid4()) for _ in range(12)]
    for user in users:
        await jobs.grant_credits(user, 10, "test", premium=None, new_user_credits=0)

    # max_attempts 0 breaks a CHECK constraint: no create rule answers it, so the whole batched call fails.
    calls = [create(jobs, user, max_attempts=0 if i == 7 else 3) for i, user in enumerate(users)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert jobs.batches and max(jobs.batches) > 1
    assert isinstance(outcomes[7], asyncpg.CheckViolationError)
    assert all(isinstance(o, CreatedJob) and o.created for i, o in enumerate(outcomes) if i != 7)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM generation_jobs") == 11
        await assert_credits_consistent(conn)
    finally:
        await conn.close()


async def test_batched_creates_claim_the_jobs_they_are_asked_to_claim(store: tuple[CountingStore, str]) -> None:
    jobs, url = store
    users = [str(uuid.uuid4()) for _ in range(24)]
    for user in users:
        await jobs.grant_credits(user, 10, "test", premium=None, new_user_credits=0)

    # Every other create claims its job for replica "w" (as JobManager.create_job asks when its dispatcher has room).
    # The others stay pending: at a lower priority, so that they are not ahead of the claimed ones in the queue
    # (a create does not claim its job while a due job ahead of it waits; see test_priority_and_deadlines).
    claims = [ClaimAtCreate("w", 30.0) if i % 2 else None for i in range(len(users))]
    outcomes = await asyncio.gather(
        *(create(jobs, user, claim=c, priority=None if c else 0) for user, c in zip(users, claims, strict=True))
    )

    assert jobs.batches and max(jobs.batches) > 1
    conn = await asyncpg.connect(url)
    try:
        for made, claim in zip(outcomes, claims, strict=True):
            job = made.claimed or made.job  # as the create left it
            assert made.created
            events = [
                (r["seq"], r["type"], r["attempt"])
                for r in await conn.fetch("SELECT * FROM job_events WHERE job_id = $1 ORDER BY seq", job.id)
            ]
            if claim:
                assert (job.status.value, job.attempt, job.lease_owner) == ("generating", 1, "w")
                assert events == [(1, "created", 0), (2, "attempt_started", 1)]
            else:
                assert (job.status.value, job.attempt, job.lease_owner) == ("pending", 0, None)
                assert events == [(1, "created", 0)]
        await assert_credits_consistent(conn)
    finally:
        await conn.close()


@pytest.mark.parametrize("together", [1, 24], ids=["alone", "batched"])
async def test_a_create_answers_the_job_as_created_its_claim_and_the_events_it_committed(
    store: tuple[CountingStore, str], together: int
) -> None:
    jobs, _url = store
    heard = jobs.heard
    users = [str(uuid.uuid4()) for _ in range(together)]
    for user in users:
        await jobs.grant_credits(user, 10, "test", premium=None, new_user_credits=0)
    claims = [ClaimAtCreate("w", 30.0) if i % 2 == 0 else None for i in range(together)]

    outcomes = await asyncio.gather(
        *(create(jobs, user, claim=c, priority=None if c else 0) for user, c in zip(users, claims, strict=True))
    )

    assert bool(jobs.batches) == (together > 1), jobs.batches
    delivered: list[tuple[Job, JobEvent]] = []
    for made, claim in zip(outcomes, claims, strict=True):
        job = made.job
        assert made.created
        assert (job.status, job.attempt, job.lease_owner, job.started_at, job.last_event_seq) == (
            JobState.PENDING,
            0,
            None,
            None,
            1,
        ), "CreateJob answers the job as its 'created' event left it"
        _now, stored = await jobs.job_and_events_after(job.id, 0)
        assert list(made.events) == stored, "the events are the ones the database holds, time and all"
        if claim:
            assert made.claimed is not None
            assert (made.claimed.status, made.claimed.attempt, made.claimed.lease_owner) == (
                JobState.GENERATING,
                1,
                "w",
            )
            assert made.claimed == await jobs.get_job(job.id), "the claimed job is the row as the create left it"
            assert [e.type for e in made.events] == [JobEventType.CREATED, JobEventType.ATTEMPT_STARTED]
        else:
            assert made.claimed is None
            assert [e.type for e in made.events] == [JobEventType.CREATED]
        delivered += [(made.claimed or job, event) for event in made.events]
    assert sorted(heard, key=lambda h: (h[1].job_id, h[1].seq)) == sorted(
        delivered, key=lambda h: (h[1].job_id, h[1].seq)
    ), "the listener heard each committed event once, with the job as the create left it"

    first = await create(jobs, users[-1], request_id="again", claim=ClaimAtCreate("w", 30.0))
    heard.clear()
    again = await create(jobs, users[-1], request_id="again", claim=ClaimAtCreate("w", 30.0))
    assert (again.created, again.claimed, again.events, heard) == (False, None, (), [])
    assert again.job == await jobs.get_job(first.job.id), "a replay answers the earlier job as it is now"


async def test_the_previous_create_function_still_answers_as_it_did(store: tuple[CountingStore, str]) -> None:
    """imagegen_create_job_v4 now runs v5's body: a replica of the previous version, during an upgrade, still gets
    the job as the call left it (generating when it claimed it)."""
    _jobs, url = store
    conn = await asyncpg.connect(url)
    try:
        answers = []
        for claim_owner in ("old-replica", None):
            answers.append(
                await conn.fetchrow(
                    """SELECT (r.job).status, (r.job).attempt, (r.job).lease_owner, (r.job).last_event_seq, r.created
                       FROM imagegen_create_job_v4($1, 'p', 'local', '{}', NULL, NULL, 'h', 1, 1, 3, 10, 100, $2, 30,
                                                   NULL, NULL, NULL, NULL, NULL, NULL) r""",
                    uuid.uuid4(),
                    claim_owner,
                )
            )
        assert [tuple(answer) for answer in answers] == [
            ("generating", 1, "old-replica", 2, True),
            ("pending", 0, None, 1, True),
        ]
        await assert_credits_consistent(conn)
    finally:
        await conn.close()
