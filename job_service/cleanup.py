"""The storage sweeper: deletes from the bucket what ended jobs left there and no job row records.

`storage_cleanups` (migration 20261206000080) holds one row per job folder still to sweep, written by a trigger
in the transaction that ends the job. Every replica runs a Sweeper: it takes due rows with FOR UPDATE SKIP LOCKED
and pushes their `not_before` past the time a deletion can take, as a lease, in the same statement (so two
replicas never work on the same row at once, and a replica that dies mid-way leaves its rows to be taken again
once the lease has run out); then it asks the generator to delete the folder's objects but the recorded ones
(DeleteJobObjects, idempotent) and deletes the row only when that succeeded. A failure keeps the row: its tries
go up, its last error is kept and it waits a jittered exponential backoff. Nothing leaves the table but by a
deletion that succeeded. The row's writes are fenced on the `not_before` its lease set, so a sweeper whose lease
ran out (and whose row another took, or a new request replaced) changes nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg
import structlog

from job_service.dispatcher import retry_delay
from job_service.periodic import PeriodicTask
from job_service.queries import queries

log = structlog.get_logger(__name__)

# last_error is the generator's reason and message, or an exception's text: bounded before it is stored.
MAX_ERROR_CHARS = 1_000
# The lease outlasts the call by this much (the writes after it, a slow database).
_LEASE_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class Cleanup:
    """One job folder to sweep, as a sweeper took it."""

    job_id: str
    user_id: str
    keep_paths: list[str]  # the job's recorded images; empty to delete everything
    tries: int
    lease: datetime  # the not_before this sweeper set: its writes to the row are fenced on it


class ObjectDeleter(Protocol):
    async def delete_job_objects(
        self, user_id: str, job_id: str, keep_paths: list[str], *, timeout_seconds: float
    ) -> list[str]: ...


class SweepObserver(Protocol):
    def objects_deleted(self, count: int) -> None: ...

    def sweep_failed(self) -> None: ...


class CleanupStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = queries()

    async def take_due(self, limit: int, delay_seconds: float, lease_seconds: float) -> list[Cleanup]:
        """Up to `limit` rows due now (and older than `delay_seconds`), leased for `lease_seconds`.

        The keep list is read with them: the job's recorded images (result_paths, and images[].storage_path in
        case the two ever differ), or nothing for a row that asks for everything or whose job is gone.
        """
        rows = await self._pool.fetch(self._sql["cleanup_take_due"], limit, delay_seconds, lease_seconds)
        return [
            Cleanup(row["job_id"], row["user_id"], list(row["keep_paths"]), row["tries"], row["not_before"])
            for row in rows
        ]

    async def done(self, cleanup: Cleanup) -> bool:
        """Deletes the row, if this sweeper's lease still holds it."""
        status = await self._pool.execute(self._sql["cleanup_done"], cleanup.job_id, cleanup.lease)
        return str(status) == "DELETE 1"

    async def failed(self, cleanup: Cleanup, error: str, retry_in_seconds: float) -> bool:
        """Records a failed try and when to try again, if this sweeper's lease still holds the row."""
        status = await self._pool.execute(
            self._sql["cleanup_failed"],
            cleanup.job_id,
            cleanup.lease,
            error[:MAX_ERROR_CHARS],
            retry_in_seconds,
        )
        return str(status) == "UPDATE 1"

    async def waiting(self) -> int:
        """Rows in the table: folders still to sweep, due or not (all replicas)."""
        count = await self._pool.fetchval(self._sql["cleanup_waiting"])
        return int(count)


@dataclass(frozen=True)
class SweeperConfig:
    # A job's folder is swept this long after the job ended, not before (see JobSettings.cleanup_delay_seconds).
    delay_seconds: float
    interval_seconds: float
    batch_size: int
    call_timeout_seconds: float
    backoff_base_seconds: float
    backoff_max_seconds: float


class Sweeper:
    def __init__(
        self, store: CleanupStore, deleter: ObjectDeleter, config: SweeperConfig, observer: SweepObserver
    ) -> None:
        self._store = store
        self._deleter = deleter
        self._config = config
        self._observer = observer
        # After a failed sweep, the next waits the interval as any other.
        self._loop = PeriodicTask(
            "storage-sweeper", "storage sweep", self._round, after_failure=lambda _: config.interval_seconds
        )

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        """Sweeps now instead of at the next interval (tests, an operator's nudge)."""
        self._loop.wake()

    async def stop(self, patience_seconds: float = 10.0) -> None:
        """Lets a sweep under way finish within `patience_seconds`, then stops; rows it leaves are retaken later."""
        await self._loop.stop(patience_seconds)

    async def _round(self) -> float:
        taken = await self.sweep_once()
        # A full batch: more may be due right now.
        return 0.0 if taken >= self._config.batch_size else self._config.interval_seconds

    async def sweep_once(self) -> int:
        """Takes one batch of due rows and sweeps them (concurrently); how many were taken."""
        cleanups = await self._store.take_due(
            self._config.batch_size,
            self._config.delay_seconds,
            self._config.call_timeout_seconds + _LEASE_MARGIN_SECONDS,
        )
        # Each sweep ends on its own: one whose row write hit a database outage must not leave the others running
        # unwatched (gather would raise at once); its row is taken again once its lease has run out.
        outcomes = await asyncio.gather(*(self._sweep(cleanup) for cleanup in cleanups), return_exceptions=True)
        for cleanup, outcome in zip(cleanups, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(
                    "storage sweep could not record its outcome; the row is retried after its lease",
                    job_id=cleanup.job_id,
                    error=str(outcome)[:MAX_ERROR_CHARS] or type(outcome).__name__,
                )
        return len(cleanups)

    async def _sweep(self, cleanup: Cleanup) -> None:
        try:
            deleted = await self._deleter.delete_job_objects(
                cleanup.user_id,
                cleanup.job_id,
                cleanup.keep_paths,
                timeout_seconds=self._config.call_timeout_seconds,
            )
        except Exception as exc:  # the generator's error (GenerationFailure) or anything else: the row stays
            tries = cleanup.tries + 1
            delay = retry_delay(tries, self._config.backoff_base_seconds, self._config.backoff_max_seconds, None)
            self._observer.sweep_failed()
            log.warning(
                "storage sweep of a job failed; will retry",
                job_id=cleanup.job_id,
                tries=tries,
                error=str(exc)[:MAX_ERROR_CHARS],
                retry_in_seconds=round(delay, 1),
            )
            await self._store.failed(cleanup, str(exc) or type(exc).__name__, delay)
            return
        self._observer.objects_deleted(len(deleted))
        if not await self._store.done(cleanup):
            # Another sweeper took the row after this lease ran out, or a new request replaced it: it stays theirs.
            log.info("storage sweep finished after its lease; the row was left as it is", job_id=cleanup.job_id)
        if deleted:
            log.info("orphan objects deleted", job_id=cleanup.job_id, user_id=cleanup.user_id, deleted=len(deleted))
