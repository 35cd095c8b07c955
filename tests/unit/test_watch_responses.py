"""WatchJob messages shared by a job's watchers: made once per event, and not kept once every watcher is past it."""

from __future__ import annotations

import gc
import uuid
from datetime import UTC, datetime
from typing import Any

from job_service.domain import Job, JobEvent, JobEventType, JobState, Params
from job_service.servicer import _WatchResponses


def make_job(seq: int) -> Job:
    now = datetime.now(UTC)
    fields: dict[str, Any] = dict.fromkeys(Job.__dataclass_fields__)
    fields.update(
        id=str(uuid.uuid4()), user_id="u", status=JobState.GENERATING, prompt="p", model="m", params=Params(),
        images=[], filtered_reasons=[], filtered_count=0, attempt=1, failed_attempts=0, max_attempts=3,
        credits_reserved=4, credits_charged=0, cancel_requested=False, created_at=now, updated_at=now,
        next_attempt_at=now, last_event_seq=seq,
    )  # fmt: skip
    return Job(**fields)


def test_every_watcher_of_an_event_gets_the_same_message() -> None:
    responses = _WatchResponses()
    job = make_job(3)
    event = JobEvent(job.id, 3, JobEventType.GENERATION_STARTED, JobState.GENERATING, 1, job.updated_at)
    first = responses.get(job, event)
    assert responses.get(job, event) is first
    assert first.job.id == job.id and first.event.seq == 3
    other = JobEvent(job.id, 3, JobEventType.GENERATION_STARTED, JobState.GENERATING, 1, job.updated_at)
    assert responses.get(job, other) is not first, "another event object (another read) is converted anew"


def test_an_entry_goes_once_no_watcher_holds_its_event() -> None:
    responses = _WatchResponses()
    job = make_job(2)
    kept = JobEvent(job.id, 2, JobEventType.ATTEMPT_STARTED, JobState.GENERATING, 1, job.updated_at)
    responses.get(job, kept)
    for seq in range(3, 103):
        responses.get(job, JobEvent(job.id, seq, JobEventType.IMAGE_STORED, JobState.GENERATING, 1, job.updated_at))
    gc.collect()
    assert len(responses) == 1, "only the event still held has an entry"
    del kept
    gc.collect()
    assert len(responses) == 0
