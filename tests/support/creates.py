"""A create as JobManager.create_job makes it, for the tests of the dispatcher and the store without the gRPC layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from job_service.dispatcher import Dispatcher
from job_service.domain import Job
from job_service.store import ClaimAtCreate, CreatedJob

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
            if made is not None and made.claimed is not None:
                dispatcher.adopt(slot, made.claimed)
            else:
                dispatcher.release(slot)
    return made.claimed or made.job, made.created
