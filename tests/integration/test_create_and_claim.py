"""CreateJob on a replica with room: the job is claimed in the transaction that creates it and runs there.

CreateJob answers the job as its 'created' event left it (JOB_STATE_PENDING, attempt 0), whatever the same
transaction did next; and a CreateJob whose caller goes away mid-create still makes its job, which still runs on
the replica that claimed it (not after its lease, not from another claim).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
from imagegen.job.v1 import job_service_pb2 as pb

from tests.support.cluster import eventually
from tests.support.ledger import assert_credits_consistent
from tests.support.services import new_user, running_services


async def history(db: asyncpg.Connection, job_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT *, detail ->> 'worker' AS worker FROM job_events WHERE job_id = $1 ORDER BY seq", uuid.UUID(job_id)
    )


async def test_create_job_answers_the_job_as_created_while_its_first_attempt_starts_with_it(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    async with running_services(database_url, tmp_path) as services, services.client(new_user()) as client:
        job = await client.create_job("a lighthouse at dusk", sample_count=1)
        done = await client.wait(job.id, timeout=30)

    assert (job.state, job.attempt) == (pb.JOB_STATE_PENDING, 0)
    assert not job.HasField("start_time")
    events = await history(db, job.id)
    assert [(e["seq"], e["type"], e["status"], e["attempt"]) for e in events[:2]] == [
        (1, "created", "pending", 0),
        (2, "attempt_started", "generating", 1),
    ]
    assert events[0]["at"] == events[1]["at"], "claimed in the transaction that created it"
    assert events[1]["worker"] == services.job.owner
    assert (done.state, done.attempt) == (pb.JOB_STATE_COMPLETED, 1)


async def test_a_create_whose_caller_went_away_still_makes_its_job_and_runs_it_here(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path) as services, services.client(user) as client:
        await client.credit_balance()  # opens the account, so that its row can be locked
        locker = await asyncpg.connect(database_url)
        try:
            # pg_stat_activity is read once per transaction: the lock is held on a connection of its own, so that the
            # polls below (on `db`) each see the activity as it is.
            async with locker.transaction():
                # The create waits in the database for this lock (every create takes its account's row lock first).
                await locker.execute("SELECT 1 FROM credit_accounts WHERE user_id = $1 FOR UPDATE", uuid.UUID(user))
                caller = asyncio.create_task(client.create_job("nobody waits for me", sample_count=1))
                waiting = await eventually(
                    lambda: db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND query LIKE '%imagegen_create_job_v5%'"
                    ),
                    lambda n: n == 1,
                    within=10,
                )
                assert waiting == 1, "the create is under way, waiting for the account"
                caller.cancel()
                await asyncio.gather(caller, return_exceptions=True)
                await asyncio.sleep(0.5)  # the cancel reaches the server's handler
        finally:
            await locker.close()
        job_id = await eventually(
            lambda: db.fetchval("SELECT id::text FROM generation_jobs WHERE user_id = $1", uuid.UUID(user)),
            lambda found: found is not None,
            within=10,
        )
        assert job_id is not None, "the create went on without its caller"
        done = await client.wait(job_id, timeout=30)

    assert caller.cancelled()
    assert (done.state, done.attempt) == (pb.JOB_STATE_COMPLETED, 1)
    events = await history(db, job_id)
    assert [e["type"] for e in events[:2]] == ["created", "attempt_started"]
    assert events[0]["at"] == events[1]["at"], "it ran from its create, not from a later claim"
    assert events[1]["worker"] == services.job.owner
    await assert_credits_consistent(db)
