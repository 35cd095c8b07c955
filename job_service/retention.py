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

log = structlog.get_logger(__name__)

SECONDS_PER_DAY = 86_400.0
# Ended: whatever the terminal states are (a new one, such as an expired state, is ended too).
_ENDED = "status NOT IN ('pending', 'generating')"

# The row's URLs go with the objects, for those who read the row itself (Supabase Realtime and RLS readers): each
# image keeps its place, path and size with an empty url, as GetJob shows it.
_NO_URLS = """coalesce((SELECT jsonb_agg(jsonb_set(i, '{url}', '""') ORDER BY n)
                   FROM jsonb_array_elements(images) WITH ORDINALITY AS e(i, n)), '[]'::jsonb)"""

# Queues the objects of the jobs `due` selects for deletion: marks their images deleted and upserts a nothing-kept
# storage_cleanups row whose created_at is when the job ended (the sweeper's delay counts from then).
_QUEUE = """
WITH due AS (
    SELECT id FROM generation_jobs
    WHERE images_deleted_at IS NULL AND {ended} AND {which}
    ORDER BY {order}
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE generation_jobs g SET images_deleted_at = now(), result_urls = '{{}}', images = {no_urls}
    FROM due WHERE g.id = due.id
    RETURNING g.id, g.user_id, g.completed_at
), queued AS (
    INSERT INTO storage_cleanups (job_id, user_id, keep_all_recorded, created_at)
    SELECT id, user_id, false, coalesce(completed_at, now()) FROM marked
    ON CONFLICT (job_id) DO UPDATE SET keep_all_recorded = false, not_before = now()
)
SELECT count(*) FROM marked
"""

# An input image (job_input_blobs row) no job names is deleted only once no CreateJob has stored it for this long:
# CreateJob stores the bytes first and inserts its job after (each its own transaction), so a younger row may belong
# to a create in flight whose job is not visible yet. Storing an image again refreshes its created_at.
INPUT_BLOB_GRACE_SECONDS = 3600.0

# A job's inline input images (params.input_images[].sha256) that no other job of the user names.
_UNNAMED_BLOB = """NOT EXISTS (
        SELECT 1 FROM generation_jobs j
        WHERE j.user_id = b.user_id {other_than}
          AND j.params -> 'input_images' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256)))"""

# Deletes the jobs `which` selects whose objects are confirmed gone: queued, and their storage_cleanups row deleted
# by a sweep that succeeded. The same statement deletes their input images that no other job names (the CTEs share
# one snapshot, so the jobs being deleted here are left out of that check by id); one two jobs shared, deleted by
# two replicas at once, or stored again within the grace, is left to the orphan sweep (delete_orphan_blobs).
_DELETE = """
WITH gone AS (
    SELECT g.id FROM generation_jobs g
    WHERE g.images_deleted_at IS NOT NULL AND {ended} AND {which}
      AND NOT EXISTS (SELECT 1 FROM storage_cleanups c WHERE c.job_id = g.id)
    ORDER BY {order}
    LIMIT $1
    FOR UPDATE OF g SKIP LOCKED
), deleted AS (
    DELETE FROM generation_jobs g USING gone WHERE g.id = gone.id
    RETURNING g.id, g.user_id, g.params
), inputs AS (
    SELECT DISTINCT d.user_id, i ->> 'sha256' AS sha256
    FROM deleted d, jsonb_array_elements(coalesce(d.params -> 'input_images', '[]'::jsonb)) AS i
    WHERE jsonb_typeof(i) = 'object' AND i ? 'sha256'
), blobs AS (
    DELETE FROM job_input_blobs b USING inputs
    WHERE b.user_id = inputs.user_id AND b.sha256 = inputs.sha256
      AND b.created_at <= now() - make_interval(secs => {grace})
      AND {unnamed}
)
SELECT id FROM deleted
"""

# Input images no job names (a refused CreateJob's; one whose jobs' deletion left it, see above), stored at least
# `$2` seconds ago, up to `$1` of them.
_DELETE_ORPHAN_BLOBS = f"""
WITH due AS (
    SELECT b.user_id, b.sha256 FROM job_input_blobs b
    WHERE b.created_at <= now() - make_interval(secs => $2)
      AND {_UNNAMED_BLOB.format(other_than="")}
    ORDER BY b.created_at
    LIMIT $1
    FOR UPDATE OF b SKIP LOCKED
)
DELETE FROM job_input_blobs b USING due WHERE b.user_id = due.user_id AND b.sha256 = due.sha256
RETURNING b.sha256
"""

_DELETED = "deleted_at IS NOT NULL"
_PAST = "completed_at <= now() - make_interval(secs => $2)"

_QUEUE_DELETED = _QUEUE.format(ended=_ENDED, which=_DELETED, order="deleted_at", no_urls=_NO_URLS)
_QUEUE_EXPIRED = _QUEUE.format(ended=_ENDED, which=_PAST, order="completed_at", no_urls=_NO_URLS)
_DELETE_BLOBS = {
    "grace": INPUT_BLOB_GRACE_SECONDS,
    "unnamed": _UNNAMED_BLOB.format(other_than="AND j.id NOT IN (SELECT id FROM deleted)"),
}
_DELETE_DELETED = _DELETE.format(ended="g." + _ENDED, which="g." + _DELETED, order="g.deleted_at", **_DELETE_BLOBS)
_DELETE_EXPIRED = _DELETE.format(ended="g." + _ENDED, which="g." + _PAST, order="g.completed_at", **_DELETE_BLOBS)

# DeleteJob: the job is marked deleted, and if it has ended its objects are queued in the same statement (one that
# is still running is queued by the next pass after it ends). Ownership was checked by the caller; the
# `deleted_at IS NULL` makes a second deletion (or two at once) find nothing.
_MARK_DELETED = f"""
WITH marked AS (
    UPDATE generation_jobs SET deleted_at = now(),
        images_deleted_at = CASE WHEN {_ENDED} THEN now() ELSE images_deleted_at END,
        result_urls = CASE WHEN {_ENDED} THEN '{{}}' ELSE result_urls END,
        images = CASE WHEN {_ENDED} THEN {_NO_URLS} ELSE images END
    WHERE id = $1 AND deleted_at IS NULL
    RETURNING id, user_id, completed_at, {_ENDED} AS ended
), queued AS (
    INSERT INTO storage_cleanups (job_id, user_id, keep_all_recorded, created_at)
    SELECT id, user_id, false, coalesce(completed_at, now()) FROM marked WHERE ended
    ON CONFLICT (job_id) DO UPDATE SET keep_all_recorded = false, not_before = now()
)
SELECT ended FROM marked
"""


class RetentionStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def mark_deleted(self, job_id: str) -> bool | None:
        """Marks the job deleted: None if it was not there to delete, else whether its objects were queued now."""
        ended = await self._pool.fetchval(_MARK_DELETED, job_id)
        return None if ended is None else bool(ended)

    async def queue_deleted(self, limit: int) -> int:
        """Queues the objects of up to `limit` jobs deleted by DeleteJob that have ended since."""
        return int(await self._pool.fetchval(_QUEUE_DELETED, limit))

    async def queue_expired(self, limit: int, after_seconds: float) -> int:
        """Queues the objects of up to `limit` jobs that ended more than `after_seconds` ago."""
        return int(await self._pool.fetchval(_QUEUE_EXPIRED, limit, after_seconds))

    async def delete_deleted(self, limit: int) -> int:
        """Deletes up to `limit` rows of jobs deleted by DeleteJob whose objects are gone."""
        return len(await self._pool.fetch(_DELETE_DELETED, limit))

    async def delete_expired(self, limit: int, after_seconds: float) -> int:
        """Deletes up to `limit` rows of jobs that ended more than `after_seconds` ago and whose objects are gone."""
        return len(await self._pool.fetch(_DELETE_EXPIRED, limit, after_seconds))

    async def delete_orphan_blobs(self, limit: int, older_than_seconds: float = INPUT_BLOB_GRACE_SECONDS) -> int:
        """Deletes up to `limit` input images that no job names and that were stored over `older_than_seconds` ago."""
        return len(await self._pool.fetch(_DELETE_ORPHAN_BLOBS, limit, older_than_seconds))


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
