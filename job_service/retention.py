"""Retention and deletion of jobs: objects first, through the storage sweeper; then the rows.

There is one deletion mechanism (job_service/cleanup.py): a `storage_cleanups` row with nothing kept
(`keep_all_recorded = false`) has the storage sweeper delete every object of a job's folder through the generator's
DeleteJobObjects, retried with backoff until it succeeds, and the row is deleted only then. This module decides
which jobs go through it and removes their rows afterwards:

* **Queue.** An ended job past `JOB_IMAGE_RETENTION_DAYS` (or deleted by DeleteJob) gets `images_deleted_at` and
  a nothing-kept `storage_cleanups` row in one statement. An existing row (the orphans of a failed attempt, say) is
  turned into a nothing-kept one and its `not_before` reset: that also fences a sweep of it in flight, whose keep
  list is now wrong (its `done` no longer matches the lease and leaves the row for the next sweep).
* **Delete.** An ended job whose objects were queued (`images_deleted_at` set) and whose `storage_cleanups` row has
  gone (the sweep succeeded: the generator found the folder empty of all but nothing) is deleted, with its events
  (ON DELETE CASCADE) when it was deleted by DeleteJob or is past `JOB_JOB_RETENTION_DAYS`. Its credit ledger rows
  stay, their `job_id` set to NULL (migration 20261206000220), so `balance = sum(ledger)` holds.

Every step takes at most `batch_size` jobs with FOR UPDATE SKIP LOCKED, so any number of replicas run it at once
and each job is queued and deleted by one of them; a replica that dies mid-step has its transaction rolled back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import structlog

from job_service.periodic import PeriodicTask
from job_service.queries import queries

log = structlog.get_logger(__name__)

SECONDS_PER_DAY = 86_400.0

# An input image (job_input_blobs row) no job names is deleted only once no CreateJob has stored it for this long:
# CreateJob stores the bytes first and inserts its job after (each its own transaction), so a younger row may belong
# to a create in flight whose job is not visible yet. Storing an image again refreshes its created_at. The job
# deletes (retention_delete_deleted/_expired in job_service/sql/queries.sql) hold it as a literal.
INPUT_BLOB_GRACE_SECONDS = 3600.0


class RetentionStore:
    """The retention steps, each one statement of job_service/sql/queries.sql (their rules are written there)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = queries()

    async def mark_deleted(self, job_id: str) -> bool | None:
        """Marks the job deleted: None if it was not there to delete, else whether its objects were queued now."""
        ended = await self._pool.fetchval(self._sql["retention_mark_deleted"], job_id)
        return None if ended is None else bool(ended)

    async def queue_deleted(self, limit: int) -> int:
        """Queues the objects of up to `limit` jobs deleted by DeleteJob that have ended since."""
        return int(await self._pool.fetchval(self._sql["retention_queue_deleted"], limit))

    async def queue_expired(self, limit: int, after_seconds: float) -> int:
        """Queues the objects of up to `limit` jobs that ended more than `after_seconds` ago."""
        return int(await self._pool.fetchval(self._sql["retention_queue_expired"], limit, after_seconds))

    async def delete_deleted(self, limit: int) -> int:
        """Deletes up to `limit` rows of jobs deleted by DeleteJob whose objects are gone."""
        return len(await self._pool.fetch(self._sql["retention_delete_deleted"], limit))

    async def delete_expired(self, limit: int, after_seconds: float) -> int:
        """Deletes up to `limit` rows of jobs that ended more than `after_seconds` ago and whose objects are gone."""
        return len(await self._pool.fetch(self._sql["retention_delete_expired"], limit, after_seconds))

    async def delete_orphan_blobs(self, limit: int, older_than_seconds: float = INPUT_BLOB_GRACE_SECONDS) -> int:
        """Deletes up to `limit` input images that no job names and that were stored over `older_than_seconds` ago."""
        return len(await self._pool.fetch(self._sql["retention_delete_orphan_blobs"], limit, older_than_seconds))


@dataclass(frozen=True)
class RetentionConfig:
    # Days after a job ended that its images are deleted; 0: kept for ever.
    image_retention_days: float
    # Days after a job ended that the job itself (row and events) is deleted; 0: kept for ever.
    job_retention_days: float
    interval_seconds: float
    batch_size: int

    @property
    def images_after_seconds(self) -> float | None:
        """When images go: their own retention, or the job's if that is shorter (a row goes after its objects)."""
        days = [d for d in (self.image_retention_days, self.job_retention_days) if d > 0]
        return min(days) * SECONDS_PER_DAY if days else None

    @property
    def jobs_after_seconds(self) -> float | None:
        return self.job_retention_days * SECONDS_PER_DAY if self.job_retention_days > 0 else None


class RetentionObserver(Protocol):
    def images_expired(self, count: int) -> None: ...

    def jobs_deleted(self, reason: str, count: int) -> None: ...


@dataclass(frozen=True)
class PassResult:
    images_queued: int  # jobs whose objects this pass queued (retention and DeleteJob)
    jobs_deleted: int  # rows this pass deleted
    full: bool  # a step took a full batch: more may be due right now


class RetentionSweeper:
    """Runs the retention pass on every replica, every `interval_seconds` (at once after a full batch)."""

    def __init__(
        self,
        store: RetentionStore,
        config: RetentionConfig,
        observer: RetentionObserver,
        queued: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._config = config
        self._observer = observer
        # Told when objects were queued: the storage sweeper is woken instead of waiting for its interval.
        self._queued = queued
        # After a failed pass, the next waits the interval as any other.
        self._loop = PeriodicTask(
            "retention-sweeper", "retention pass", self._round, after_failure=lambda _: config.interval_seconds
        )

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        self._loop.wake()

    async def stop(self, patience_seconds: float = 10.0) -> None:
        """Lets a pass under way finish within `patience_seconds` (a cancelled one is rolled back), then stops."""
        await self._loop.stop(patience_seconds)

    async def _round(self) -> float:
        # A step took a full batch: more may be due right now.
        return 0.0 if (await self.pass_once()).full else self._config.interval_seconds

    async def pass_once(self) -> PassResult:
        """One bounded pass: each of its five steps takes at most `batch_size` jobs (or input images)."""
        limit = self._config.batch_size
        images_after = self._config.images_after_seconds
        jobs_after = self._config.jobs_after_seconds
        deleted_queued = await self._store.queue_deleted(limit)
        expired = await self._store.queue_expired(limit, images_after) if images_after is not None else 0
        if expired:
            self._observer.images_expired(expired)
        if deleted_queued or expired:
            self._queued()
        removed_deleted = await self._store.delete_deleted(limit)
        if removed_deleted:
            self._observer.jobs_deleted("delete_job", removed_deleted)
        removed_expired = await self._store.delete_expired(limit, jobs_after) if jobs_after is not None else 0
        if removed_expired:
            self._observer.jobs_deleted("retention", removed_expired)
        orphan_blobs = await self._store.delete_orphan_blobs(limit)
        if deleted_queued or expired or removed_deleted or removed_expired or orphan_blobs:
            log.info(
                "retention pass",
                deleted_jobs_queued=deleted_queued,
                expired_jobs_queued=expired,
                deleted_jobs_removed=removed_deleted,
                expired_jobs_removed=removed_expired,
                orphan_input_images_removed=orphan_blobs,
            )
        counts = (deleted_queued, expired, removed_deleted, removed_expired, orphan_blobs)
        return PassResult(deleted_queued + expired, removed_deleted + removed_expired, max(counts) >= limit)
