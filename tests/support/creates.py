"""Creates as JobManager.create_job makes them, and a clean-up after them, for the tests of the dispatcher and the
store without the gRPC layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from job_service.dispatcher import Dispatcher
from job_service.domain import Job, JobEventType, JobState
from job_service.state_changes import StateChange
from job_service.store import ClaimAtCreate, CreatedJob, JobStore

Create = Callable[[ClaimAtCreate | None], Awaitable[CreatedJob]]


async def create_here(dispatcher: Dispatcher, create: Create) -> tuple[Job, bool]:
    """Reserves a slot (when the dispatcher has room), creates with its claim, then has the dispatcher run the job
    the create claimed or gives the slot back. Answers the job as the create left it (claimed, when it was) and
    whether the create made it."""
    slot = dispatcher.reserve()
    made: CreatedJob | None = None
    try:
        made = await create(slot.claim if slot is not None else None)
    finally:
        if slot is not None:
            dispatcher.settle(slot, made.claimed if made is not None else None)
    return made.claimed or made.job, made.created


async def cancel_unfinished(pool: asyncpg.Pool) -> None:
    """Cancels every job still pending or generating, through the store (credits released), so that nothing stays
    active for the next test sharing the database."""
    store = JobStore(pool)
    for row in await pool.fetch("SELECT id FROM generation_jobs WHERE status IN ('pending', 'generating')"):
        await store.advance(
            str(row["id"]),
            StateChange(event=JobEventType.CANCELLED, to=JobState.CANCELLED),
            attempt=None,
            from_states=(JobState.PENDING, JobState.GENERATING),
        )
