"""A Job value for tests that need one without a database: a generating job, any field overridable."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

from job_service.domain import Job, JobState, Params


def a_job(**overrides: Any) -> Job:
    now = datetime.now(UTC)
    job = Job(
        id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        status=JobState.GENERATING,
        prompt="a lighthouse at dusk",
        model="local",
        params=Params(),
        template_id=None,
        request_id=None,
        images=[],
        filtered_count=0,
        filtered_reasons=[],
        error_code=None,
        error_message=None,
        attempt=1,
        failed_attempts=0,
        max_attempts=5,
        credits_reserved=4,
        credits_charged=0,
        cancel_requested=False,
        lease_owner="test",
        created_at=now,
        started_at=now,
        updated_at=now,
        completed_at=None,
        next_attempt_at=now,
        last_event_seq=2,
    )
    return dataclasses.replace(job, **overrides)
