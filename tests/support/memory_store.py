"""The database as the dispatcher uses it (job_service.dispatcher.DispatcherStore), in memory, for unit tests.

It applies the rules of the SQL functions the real store calls (supabase/migrations): the fence of
imagegen_advance (states, attempt, only once the lease ran out), images appended with their job-level index,
counted failures, the settlement of credits when the job ends, the due time of a job sent back to pending;
imagegen_advance_batch stopping at the first change the fence refuses; imagegen_claim_jobs taking due pending
jobs into a new attempt. The integration tests keep proving the real store against PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from job_service.domain import Job, JobEvent, JobEventType, JobState, Params, StoredImage
from job_service.state_changes import StateChange

# Called before each write (the changes of one transaction), e.g. to hold it or to change the job meanwhile.
BeforeWrite = Callable[[str, Sequence[StateChange]], Awaitable[None]]


@dataclass
class _Row:
    job: Job
    price_per_image: int
    lease_expires_at: datetime | None = None
    events: list[JobEvent] = field(default_factory=list)
    # What each applied write asked for, in order (the event carries only its message).
    changes: list[StateChange] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


class MemoryStore:
    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self.before_write: BeforeWrite | None = None

    # -- set-up and inspection (the tests') ---------------------------------------------------------------

    def add_job(
        self,
        *,
        sample_count: int = 1,
        max_attempts: int = 3,
        price_per_image: int = 1,
        images: Sequence[StoredImage] = (),
        attempt: int = 0,
        failed_attempts: int = 0,
    ) -> Job:
        """A pending job, due now, with `images` delivered by earlier attempts (and `attempt` of them made)."""
        now = _now()
        job = Job(
            id=str(uuid.uuid4()),
            user_id=str(uuid.uuid4()),
            status=JobState.PENDING,
            prompt="a prompt",
            model="local",
            params=Params(sample_count=sample_count),
            template_id=None,
            request_id=None,
            images=list(images),
            filtered_count=0,
            filtered_reasons=[],
            error_code=None,
            error_message=None,
            attempt=attempt,
            failed_attempts=failed_attempts,
            max_attempts=max_attempts,
            credits_reserved=sample_count * price_per_image,
            credits_charged=0,
            cancel_requested=False,
            lease_owner=None,
            created_at=now,
            started_at=None,
            updated_at=now,
            completed_at=None,
            next_attempt_at=now,
            last_event_seq=1,
        )
        self._rows[job.id] = _Row(
            job, price_per_image, events=[JobEvent(job.id, 1, JobEventType.CREATED, job.status, 0, now)]
        )
        return job

    def events(self, job_id: str) -> list[JobEventType]:
        return [event.type for event in self._rows[job_id].events]

    def messages(self, job_id: str) -> list[str]:
        return [event.message for event in self._rows[job_id].events]

    def changes(self, job_id: str) -> list[StateChange]:
        return list(self._rows[job_id].changes)

    def job(self, job_id: str) -> Job:
        return self._rows[job_id].job

    def let_lease_run_out(self, job_id: str) -> None:
        self._rows[job_id].lease_expires_at = _now() - timedelta(seconds=1)

    # -- DispatcherStore ----------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        row = self._rows.get(job_id)
        return row.job if row is not None else None

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        now = _now()
        due = [
            row
            for row in self._rows.values()
            if row.job.status is JobState.PENDING
            and row.job.next_attempt_at <= now
            and (row.job.start_deadline is None or row.job.attempt > 0 or row.job.start_deadline > now)
        ]
        due.sort(key=lambda row: row.job.next_attempt_at)
        claimed = []
        for row in due[:limit]:
            job = row.job
            row.job = replace(
                job,
                status=JobState.GENERATING,
                attempt=job.attempt + 1,
                lease_owner=owner,
                started_at=job.started_at or now,
                updated_at=now,
                filtered_count=0,
                filtered_reasons=[],
                last_event_seq=job.last_event_seq + 1,
            )
            row.lease_expires_at = now + timedelta(seconds=lease_seconds)
            row.events.append(
                JobEvent(
                    job.id, row.job.last_event_seq, JobEventType.ATTEMPT_STARTED, row.job.status, row.job.attempt, now
                )
            )
            claimed.append(row.job)
        return claimed

    async def advance(
        self,
        job_id: str,
        change: StateChange,
        *,
        attempt: int | None,
        from_states: Sequence[JobState],
        only_if_lease_expired: bool = False,
    ) -> Job | None:
        if self.before_write is not None:
            await self.before_write(job_id, [change])
        return self._apply(job_id, change, attempt, from_states, only_if_lease_expired=only_if_lease_expired)

    async def advance_batch(
        self, job_id: str, changes: Sequence[StateChange], *, attempt: int, from_states: Sequence[JobState]
    ) -> list[Job]:
        if self.before_write is not None:
            await self.before_write(job_id, changes)
        written = []
        for change in changes:
            job = self._apply(job_id, change, attempt, from_states, only_if_lease_expired=False)
            if job is None:
                break
            written.append(job)
        return written

    async def renew_leases(self, owner: str, held: Sequence[tuple[str, int]], lease_seconds: float) -> dict[str, bool]:
        still = {}
        for job_id, attempt in held:
            row = self._rows.get(job_id)
            if (
                row is not None
                and row.job.attempt == attempt
                and row.job.status is JobState.GENERATING
                and row.job.lease_owner == owner
            ):
                row.lease_expires_at = _now() + timedelta(seconds=lease_seconds)
                still[job_id] = row.job.cancel_requested
        return still

    async def expired_leases(self, limit: int) -> list[Job]:
        now = _now()
        expired = [
            row
            for row in self._rows.values()
            if row.job.status is JobState.GENERATING and row.lease_expires_at is not None and row.lease_expires_at < now
        ]
        expired.sort(key=lambda row: row.lease_expires_at or now)
        return [row.job for row in expired[:limit]]

    async def expire_due(self, limit: int) -> list[Job]:
        now = _now()
        due = [
            row.job.id
            for row in self._rows.values()
            if row.job.status is JobState.PENDING
            and row.job.attempt == 0
            and row.job.start_deadline is not None
            and row.job.start_deadline <= now
        ][:limit]
        expiry = StateChange(
            event=JobEventType.EXPIRED,
            to=JobState.EXPIRED,
            message="The job did not start before its start deadline.",
            error_code="START_DEADLINE_EXCEEDED",
        )
        ended = [self._apply(job_id, expiry, 0, (JobState.PENDING,), only_if_lease_expired=False) for job_id in due]
        return [job for job in ended if job is not None]

    # -- imagegen_advance ---------------------------------------------------------------------------------

    def _apply(
        self,
        job_id: str,
        change: StateChange,
        attempt: int | None,
        from_states: Sequence[JobState],
        *,
        only_if_lease_expired: bool,
    ) -> Job | None:
        row = self._rows.get(job_id)
        now = _now()
        if row is None or row.job.status not in from_states or (attempt is not None and row.job.attempt != attempt):
            return None
        if only_if_lease_expired and (row.lease_expires_at is None or row.lease_expires_at >= now):
            return None
        job = row.job
        to = change.to or job.status
        images = list(job.images)
        if change.image is not None:
            images.append(replace(change.image, index=len(images)))  # the job-level index: delivery order
        filtered_count, filtered_reasons = job.filtered_count, job.filtered_reasons
        if change.filtered_count is not None:
            filtered_count, filtered_reasons = change.filtered_count, list(change.filtered_reasons or ())
        error_code, error_message = job.error_code, job.error_message
        if change.error_code is not None:
            error_code, error_message = change.error_code, change.message
        if to is JobState.COMPLETED:
            error_code = error_message = None
        reserved, charged, completed_at = job.credits_reserved, job.credits_charged, job.completed_at
        lease_owner, next_attempt_at = job.lease_owner, job.next_attempt_at
        if to.terminal:
            charged = min(len(images) * row.price_per_image, reserved)
            reserved, completed_at, lease_owner = 0, now, None
            row.lease_expires_at = None
        elif to is JobState.PENDING:
            lease_owner = None
            row.lease_expires_at = None
            next_attempt_at = now + timedelta(seconds=change.retry_delay or 0)
        row.job = replace(
            job,
            status=to,
            images=images,
            filtered_count=filtered_count,
            filtered_reasons=filtered_reasons,
            cancel_requested=change.cancel_requested if change.cancel_requested is not None else job.cancel_requested,
            failed_attempts=job.failed_attempts + (1 if change.count_failure else 0),
            error_code=error_code,
            error_message=error_message,
            credits_reserved=reserved,
            credits_charged=charged,
            completed_at=completed_at,
            lease_owner=lease_owner,
            next_attempt_at=next_attempt_at,
            last_event_seq=job.last_event_seq + 1,
            updated_at=now,
        )
        row.events.append(
            JobEvent(job_id, row.job.last_event_seq, change.event, to, job.attempt, now, change.message or "")
        )
        row.changes.append(change)
        return row.job
