"""The background worker inside every JobService replica: claim due jobs, run them, keep leases.

Durability comes from the database, not from this process: a claimed job carries a lease that this
replica renews while the attempt runs. If the replica dies, the lease runs out and any replica's
reaper sends the job back to pending. Every write for an attempt is fenced on its attempt number, so
a replica that lost its lease can change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import asyncpg
import structlog

from job_service.domain import (
    EventType,
    GenerationDone,
    GenerationEvent,
    GenerationFailure,
    GenerationStarted,
    ImageStored,
    Job,
    JobStatus,
)
from job_service.store import JobStore

log = structlog.get_logger(__name__)

GENERATING = (JobStatus.GENERATING,)
CancelReason = Literal["user", "shutdown", "lost"]
# Database trouble that a retry later can get past.
DB_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)


class Generator(Protocol):
    def generate(self, job: Job) -> AsyncIterator[GenerationEvent]: ...


@dataclass(frozen=True)
class DispatcherConfig:
    owner: str
    max_in_flight: int
    poll_interval: float
    lease_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    claim_batch: int = 32


def retry_delay(failed_attempts: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a provider's Retry-After is a floor."""
    ceiling = min(cap, base * 2 ** max(0, failed_attempts - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after or 0.0)


class Dispatcher:
    def __init__(self, store: JobStore, generator: Generator, config: DispatcherConfig) -> None:
        self._store = store
        self._generator = generator
        self._config = config
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._cancel_reasons: dict[str, CancelReason] = {}
        self._wake = asyncio.Event()
        self._claiming = True
        self._loops: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim"),
            asyncio.create_task(self._lease_loop(), name="leases"),
        ]

    def wake(self) -> None:
        self._wake.set()

    def on_notification(self, job_id: str, _seq: int, event: EventType | None) -> None:
        """Called for every NOTIFY: new or returned work wakes the claimer; a cancel stops its attempt."""
        if event in (
            None,
            EventType.CREATED,
            EventType.RETRY_SCHEDULED,
            EventType.HANDED_BACK,
            EventType.LEASE_EXPIRED,
        ):
            self.wake()
        elif event is EventType.CANCEL_REQUESTED:
            self.cancel(job_id, "user")

    def cancel(self, job_id: str, reason: CancelReason) -> None:
        entry = self._running.get(job_id)
        if entry is not None and job_id not in self._cancel_reasons:
            self._cancel_reasons[job_id] = reason
            entry[1].cancel()

    async def drain(self, grace: float) -> None:
        """Stops claiming, lets running attempts finish within `grace`, hands the rest back."""
        self._claiming = False
        self._wake.set()
        tasks = [task for _, task in self._running.values()]
        if tasks:
            log.info("draining", in_flight=len(tasks), grace_seconds=grace)
            _, still_running = await asyncio.wait(tasks, timeout=grace)
            for job_id in list(self._running):
                self.cancel(job_id, "shutdown")
            if still_running:
                await asyncio.wait(still_running, timeout=10.0)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)

    async def _claim_loop(self) -> None:
        backoff = self._config.poll_interval
        while self._claiming:
            try:
                claimed = await self._claim_once()
                backoff = self._config.poll_interval
            except DB_ERRORS as exc:
                log.warning("claim failed; will retry", error=str(exc) or type(exc).__name__)
                claimed = 0
                backoff = min(backoff * 2, 10.0)
            if claimed and len(self._running) < self._config.max_in_flight:
                continue  # there may be more due right now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)

    async def _claim_once(self) -> int:
        room = self._config.max_in_flight - len(self._running)
        if room <= 0 or not self._claiming:
            return 0
        jobs = await self._store.claim(
            self._config.owner, min(room, self._config.claim_batch), self._config.lease_seconds
        )
        for job in jobs:
            log.info("job claimed", job_id=job.id, user_id=job.user_id, attempt=job.attempt)
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._running[job.id] = (job, task)
            task.add_done_callback(functools.partial(self._forget, job.id))
        return len(jobs)

    def _forget(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._cancel_reasons.pop(job_id, None)
        self._wake.set()  # room for one more

    async def _lease_loop(self) -> None:
        interval = self._config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._reap()
            except DB_ERRORS as exc:
                log.warning("lease upkeep failed; will retry", error=str(exc) or type(exc).__name__)

    async def _renew(self) -> None:
        held = [(job.id, job.attempt) for job, _ in self._running.values()]
        still = await self._store.renew_leases(self._config.owner, held, self._config.lease_seconds)
        for job_id, _ in held:
            if job_id not in still:
                log.warning("lease lost; abandoning the attempt", job_id=job_id)
                self.cancel(job_id, "lost")
            elif still[job_id]:
                self.cancel(job_id, "user")  # a cancel whose NOTIFY we missed

    async def _reap(self) -> None:
        """Returns jobs whose worker vanished (lease ran out) to pending, or ends them."""
        for job in await self._store.expired_leases(limit=100):
            if job.id in self._running:
                continue
            if job.cancel_requested:
                await self._advance(
                    job,
                    event=EventType.CANCELLED,
                    to=JobStatus.CANCELLED,
                    message="cancelled while its worker was gone",
                    only_if_lease_expired=True,
                )
            elif job.failed_attempts + 1 >= job.max_attempts:
                await self._advance(
                    job,
                    event=EventType.FAILED,
                    to=JobStatus.FAILED,
                    error_code="LEASE_EXPIRED",
                    count_failure=True,
                    message="the worker running the last attempt stopped responding",
                    only_if_lease_expired=True,
                )
            else:
                await self._advance(
                    job,
                    event=EventType.LEASE_EXPIRED,
                    to=JobStatus.PENDING,
                    count_failure=True,
                    message=f"worker {job.lease_owner} stopped responding",
                    only_if_lease_expired=True,
                )
            log.warning("lease expired", job_id=job.id, attempt=job.attempt, owner=job.lease_owner)

    async def _advance(self, job: Job, **changes: Any) -> Job | None:
        """A write for `job`'s attempt, fenced: it lands only while this attempt still holds the job."""
        return await self._store.advance(job.id, attempt=job.attempt, from_statuses=GENERATING, **changes)

    async def _run(self, job: Job) -> None:
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            reason = self._cancel_reasons.get(job.id)
            if reason is None:
                raise  # not ours: the process is going down
            await self._after_cancel(job, reason)
        except GenerationFailure as failure:
            await self._after_failure(job, failure)
        except DB_ERRORS as exc:
            # The lease runs out and another attempt starts; nothing here can be trusted to land.
            log.warning(
                "database unavailable during attempt; leaving it to the lease",
                job_id=job.id,
                error=str(exc) or type(exc).__name__,
            )
        except Exception:
            log.exception("attempt crashed", job_id=job.id)
            await self._after_failure(job, GenerationFailure("INTERNAL", "internal error in JobService", True))

    async def _attempt(self, job: Job) -> None:
        async for event in self._generator.generate(job):
            if isinstance(event, GenerationStarted):
                updated = await self._advance(
                    job, event=EventType.GENERATION_STARTED, message=f"provider {event.provider}"
                )
            elif isinstance(event, ImageStored):
                updated = await self._advance(job, event=EventType.IMAGE_STORED, image=event.image)
            else:
                assert isinstance(event, GenerationDone)
                updated = await self._advance(
                    job,
                    event=EventType.COMPLETED,
                    to=JobStatus.COMPLETED,
                    filtered_count=event.filtered_count,
                    filtered_reasons=event.filtered_reasons,
                    message=f"{event.delivered_count} delivered, {event.filtered_count} filtered",
                )
                if updated is not None:
                    log.info(
                        "job completed",
                        job_id=job.id,
                        user_id=job.user_id,
                        delivered=event.delivered_count,
                        filtered=event.filtered_count,
                        charged=updated.credits_charged,
                    )
                return
            if updated is None:
                log.warning("attempt fenced out; stopping it", job_id=job.id, attempt=job.attempt)
                return
        raise GenerationFailure("STREAM_ENDED", "the generator ended the stream without completing", True)

    async def _after_failure(self, job: Job, failure: GenerationFailure) -> None:
        failed_attempts = job.failed_attempts + (1 if failure.counts else 0)
        if failure.retryable and failed_attempts < job.max_attempts:
            delay = retry_delay(
                failed_attempts or 1,
                self._config.retry_base_seconds,
                self._config.retry_max_seconds,
                failure.retry_after,
            )
            await self._advance(
                job,
                event=EventType.RETRY_SCHEDULED,
                to=JobStatus.PENDING,
                error_code=failure.reason,
                message=failure.message,
                retry_delay=delay,
                count_failure=failure.counts,
            )
            log.info(
                "attempt failed; retry scheduled",
                job_id=job.id,
                reason=failure.reason,
                retry_in_seconds=round(delay, 2),
            )
        else:
            await self._advance(
                job,
                event=EventType.FAILED,
                to=JobStatus.FAILED,
                error_code=failure.reason,
                message=failure.message,
                count_failure=failure.counts,
            )
            log.info("job failed", job_id=job.id, user_id=job.user_id, reason=failure.reason)

    async def _after_cancel(self, job: Job, reason: CancelReason) -> None:
        if reason == "user":
            await self._advance(job, event=EventType.CANCELLED, to=JobStatus.CANCELLED, message="cancelled by the user")
            log.info("job cancelled", job_id=job.id)
        elif reason == "shutdown":
            await self._advance(
                job,
                event=EventType.HANDED_BACK,
                to=JobStatus.PENDING,
                message=f"worker {self._config.owner} shut down (shutdown)",
            )
            log.info("job handed back", job_id=job.id)
