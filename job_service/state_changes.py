"""One state change of a job: what a write through imagegen_advance asks the database to do, as a typed value.

The dispatcher builds them for each attempt (CancelJob for a cancel); JobStore.advance / advance_batch take them
and turn them into the SQL function's parameters. The named constructors are the changes the service makes; the
fence (which attempt, from which states) is the caller's, given with the write, not part of the change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from job_service.domain import JobEventType, JobState, StoredImage


@dataclass(frozen=True, kw_only=True)
class StateChange:
    """An event appended to the job, and what it changes in the job's row."""

    event: JobEventType
    # The state the job moves to; None: it stays in the state it is in.
    to: JobState | None = None
    # The event's message; with error_code, also the job's error message.
    message: str | None = None
    error_code: str | None = None
    # Appended to the job's images (the database gives it its job-level index, its place in delivery order).
    image: StoredImage | None = None
    # Set together: what the provider filtered out of the completed attempt, and why.
    filtered_count: int | None = None
    filtered_reasons: tuple[str, ...] | None = None
    # Seconds until a job sent back to pending is due again (None: at once).
    retry_delay: float | None = None
    cancel_requested: bool | None = None
    # The change uses up one of the job's attempts (failed_attempts + 1).
    count_failure: bool = False

    @classmethod
    def generation_started(cls, provider: str) -> StateChange:
        return cls(event=JobEventType.GENERATION_STARTED, message=f"provider {provider}")

    @classmethod
    def image_stored(cls, image: StoredImage) -> StateChange:
        return cls(event=JobEventType.IMAGE_STORED, image=image)

    @classmethod
    def completed(
        cls, message: str, *, filtered_count: int | None = None, filtered_reasons: Sequence[str] | None = None
    ) -> StateChange:
        return cls(
            event=JobEventType.COMPLETED,
            to=JobState.COMPLETED,
            message=message,
            filtered_count=filtered_count,
            filtered_reasons=tuple(filtered_reasons) if filtered_reasons is not None else None,
        )

    @classmethod
    def retry_scheduled(cls, error_code: str, message: str, *, delay: float, count_failure: bool) -> StateChange:
        return cls(
            event=JobEventType.RETRY_SCHEDULED,
            to=JobState.PENDING,
            error_code=error_code,
            message=message,
            retry_delay=delay,
            count_failure=count_failure,
        )

    @classmethod
    def failed(cls, error_code: str, message: str, *, count_failure: bool) -> StateChange:
        return cls(
            event=JobEventType.FAILED,
            to=JobState.FAILED,
            error_code=error_code,
            message=message,
            count_failure=count_failure,
        )

    @classmethod
    def cancel_requested_by_user(cls) -> StateChange:
        """Asks the replica running the attempt to stop it; the job stays generating until that replica ends it."""
        return cls(event=JobEventType.CANCEL_REQUESTED, cancel_requested=True, message="cancel requested")

    @classmethod
    def cancelled(cls, message: str = "cancelled by the user") -> StateChange:
        return cls(event=JobEventType.CANCELLED, to=JobState.CANCELLED, message=message)

    @classmethod
    def handed_back(cls, message: str) -> StateChange:
        """The attempt is given up unfinished (its replica shuts down): the job is due again at once, uncounted."""
        return cls(event=JobEventType.HANDED_BACK, to=JobState.PENDING, message=message)

    @classmethod
    def lease_expired(cls, message: str) -> StateChange:
        """The attempt's replica stopped renewing its lease: the job goes back to pending, the attempt counted."""
        return cls(event=JobEventType.LEASE_EXPIRED, to=JobState.PENDING, message=message, count_failure=True)
