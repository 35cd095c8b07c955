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
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from job_service.domain import (
    GenerationCompleted,
    GenerationEvent,
    GenerationFailure,
    GenerationStarted,
    ImageStored,
    Job,
    JobEventType,
    JobState,
)
from job_service.failure_messages import logged_detail, user_message
from job_service.mailbox import Mailbox
from job_service.state_changes import StateChange
from job_service.store import CONNECTION_ERRORS, ClaimAtCreate

log = structlog.get_logger(__name__)

GENERATING = (JobState.GENERATING,)
# The most one claim takes while a backlog makes every claim full (each claimed job is one row update, one event
# and one NOTIFY in the claim's transaction).
MAX_CLAIM_BATCH = 512
CancelReason = Literal["user", "shutdown", "lost"]


class GenerationSource(Protocol):
    """Runs one attempt of a job at the generator (job_service.generator_client.GeneratorClient)."""

    def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]: ...


class DispatcherStore(Protocol):
    """The database as the dispatcher uses it (job_service.store.JobStore; tests.support.memory_store in the unit
    tests). Every write of an attempt is fenced on its attempt number and the states it may be in."""

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]: ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def advance(
        self,
        job_id: str,
        change: StateChange,
        *,
        attempt: int | None,
        from_states: Sequence[JobState],
        only_if_lease_expired: bool = False,
    ) -> Job | None: ...

    async def advance_batch(
        self, job_id: str, changes: Sequence[StateChange], *, attempt: int, from_states: Sequence[JobState]
    ) -> list[Job]: ...

    async def renew_leases(
        self, owner: str, held: Sequence[tuple[str, int]], lease_seconds: float
    ) -> dict[str, bool]: ...

    async def expired_leases(self, limit: int) -> list[Job]: ...

    async def expire_due(self, limit: int) -> list[Job]: ...


@dataclass(frozen=True)
class DispatcherConfig:
    owner: str
    max_in_flight: int
    poll_interval: float
    lease_seconds: float
    retry_base_seconds: float
    retry_max_seconds: float
    claim_batch: int = 32
    # How long an attempt keeps retrying a write while the database is away before it leaves the job
    # to its lease (the write is fenced, so retrying late is safe).
    write_patience_seconds: float = 60.0
    # How long a drain waits for the hand-backs (and outcomes being written) after its grace, before it
    # stops what is left and leaves those jobs to their leases.
    handback_seconds: float = 10.0
    # How long a write of an attempt's images waits for what follows them (more images, the completion): the
    # images of one provider answer are stored within a millisecond or so of each other and arrive one by one
    # before the completion; without the wait the first went to the database alone, then the rest, then
    # COMPLETED, each a transaction after the other.
    image_linger_seconds: float = 0.005
    # How often this replica ends jobs past their start deadline that never started (imagegen_expire_jobs), and
    # how many one sweep takes at most (a full sweep is followed by another at once).
    expiry_interval: float = 1.0
    expiry_batch: int = 100


def retry_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Seconds before the attempt after `attempt` (1 = the first): exponential, capped, jittered.

    Equal jitter (a uniform pick in the upper half) spreads a burst of retries without ever retrying
    almost at once; a Retry-After the provider sent (RetryInfo from the generator) is a floor.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after or 0.0)


@dataclass(frozen=True)
class AfterFailure:
    """What becomes of a job whose attempt failed: retried after `delay` seconds, or failed (delay None)."""

    delay: float | None
    count_failure: bool

    @property
    def retry(self) -> bool:
        return self.delay is not None


def after_failure(job: Job, failure: GenerationFailure, base: float, cap: float) -> AfterFailure:
    """Permanent failures fail at once; retryable ones retry until max_attempts counted failures.

    A failure that does not count (the generator could not be reached at all) never uses up the
    job's attempts: the job waits for the generator instead of failing.
    """
    failed_attempts = job.failed_attempts + (1 if failure.counts else 0)
    if failure.retryable and failed_attempts < job.max_attempts:
        return AfterFailure(retry_delay(max(job.attempt, 1), base, cap, failure.retry_after), failure.counts)
    return AfterFailure(None, failure.counts)


@dataclass(frozen=True, eq=False)
class DispatchSlot:
    """Room in a replica for one job while its create is under way (Dispatcher.reserve): the create claims the
    job for this replica with `claim`, then the replica runs it or gets the room back (settle)."""

    claim: ClaimAtCreate


class _Marker:
    pass


@dataclass
class _Owed:
    """The images an attempt may still deliver: what it asked the generator for, less those it has written."""

    left: int


_ENDED = _Marker()  # the stream ended without completing
_NOTHING = _Marker()
# What the reader hands the writer: an event, the exception the stream raised, or _ENDED.
_Read = GenerationEvent | BaseException | _Marker


async def _read_stream(events: AsyncIterator[GenerationEvent], queue: Mailbox[_Read]) -> None:
    """Reads a Generate stream ahead of the writes, in order, up to its completion, failure or end."""
    try:
        async for event in events:
            queue.put(event)
            if isinstance(event, GenerationCompleted):
                return
        queue.put(_ENDED)
    except Exception as exc:  # raised by the writer once everything before it is written
        queue.put(exc)
    except asyncio.CancelledError as exc:
        # The writer stops reading before it cancels this task; a cancel from anywhere else (the stream
        # itself) reaches the writer as it did when the writer read the stream, instead of leaving it waiting.
        queue.put(exc)
        raise


class Dispatcher:
    def __init__(self, store: DispatcherStore, generator: GenerationSource, config: DispatcherConfig) -> None:
        self._store = store
        self._generator = generator
        self._config = config
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._cancel_reasons: dict[str, CancelReason] = {}
        # Reads of a job's row after a cancel_requested notification (at most one per job at a time).
        self._cancel_checks: dict[str, asyncio.Task[None]] = {}
        # Jobs whose Generate stream is open: only then does a cancel interrupt the attempt's task.
        # Afterwards the task is writing the attempt's outcome, which must not be cut in half.
        self._streaming: set[str] = set()
        self._wake = asyncio.Event()
        self._claiming = True
        self._claim_size = config.claim_batch
        # Creates under way that claim for this replica (reserve): each holds room for its job until settle.
        self._slots: set[DispatchSlot] = set()
        self._no_slots = asyncio.Event()
        self._no_slots.set()
        self._loops: list[asyncio.Task[None]] = []

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def _room(self) -> int:
        """Attempts this replica can still take: running ones and creates claiming for it hold room."""
        return self._config.max_in_flight - len(self._running) - len(self._slots)

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._expiry_loop(), name="expiry"),
        ]

    def wake(self) -> None:
        self._wake.set()

    def reserve(self) -> DispatchSlot | None:
        """Room for a job about to be created, so that its create can claim it for this replica in the transaction
        that makes it: no NOTIFY to wait for and no claim of its own between a job's creation and its attempt.

        None while draining or without room (the job is then created pending, for any replica's claim). The slot
        holds its room until settle, which the creator must call whatever becomes of the create.
        """
        if not self._claiming or self._room <= 0:
            return None
        slot = DispatchSlot(ClaimAtCreate(self._config.owner, self._config.lease_seconds))
        self._slots.add(slot)
        self._no_slots.clear()
        return slot

    def settle(self, slot: DispatchSlot, claimed: Job | None) -> None:
        """Ends the create that held `slot`, whatever became of it: runs `claimed`, the job it claimed for this
        replica (the slot's room becomes its run's), or gives the room back (the create failed, made the job without
        claiming it, or was a replay)."""
        self._end_slot(slot)
        if claimed is not None:
            self._start(claimed)
        elif self._room == 1:
            self._wake.set()  # the room held was what kept a full replica's claimer waiting

    def _end_slot(self, slot: DispatchSlot) -> None:
        self._slots.remove(slot)
        if not self._slots:
            self._no_slots.set()

    def on_notification(self, job_id: str, _seq: int, event: JobEventType | None) -> None:
        """Called for every NOTIFY: new or returned work wakes the claimer; a cancel stops its attempt."""
        if event in (
            None,
            JobEventType.CREATED,
            JobEventType.RETRY_SCHEDULED,
            JobEventType.HANDED_BACK,
            JobEventType.LEASE_EXPIRED,
        ):
            self.wake()
        elif event is JobEventType.CANCEL_REQUESTED and job_id in self._running and job_id not in self._cancel_checks:
            # Any database login can NOTIFY on the channel, so a notification is only a hint: the job's row
            # says whether a cancel was really requested for the attempt this replica runs.
            check = asyncio.create_task(self._cancel_if_row_says_so(job_id), name=f"cancel-check-{job_id}")
            self._cancel_checks[job_id] = check
            check.add_done_callback(functools.partial(self._cancel_checked, job_id))

    def _cancel_checked(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._cancel_checks.pop(job_id, None)

    def on_committed(self, job: Job, event: JobEventType) -> None:
        """The latest event of a job, which this process just committed, with the job's row as the write returned it.

        The row is the database's word, so a cancel it records stops the attempt without another read;
        anything else is handled as its notification would be.
        """
        if event is JobEventType.CANCEL_REQUESTED:
            self._cancel_if_requested_for(job)
        else:
            self.on_notification(job.id, job.last_event_seq, event)

    async def _cancel_if_row_says_so(self, job_id: str) -> None:
        try:
            current = await self._store.get_job(job_id)
        except CONNECTION_ERRORS as exc:
            # The lease renewal reads cancel_requested too: a real cancel is still acted on within a renewal.
            log.warning("could not read a job to check a cancel", job_id=job_id, error=str(exc) or type(exc).__name__)
            return
        if current is not None:
            self._cancel_if_requested_for(current)

    def _cancel_if_requested_for(self, current: Job) -> None:
        """Stops this replica's attempt of `current` if its row, for that very attempt, asks for a cancel."""
        entry = self._running.get(current.id)
        if (
            entry is not None
            and current.cancel_requested
            and current.status is JobState.GENERATING
            and current.attempt == entry[0].attempt
        ):
            self.cancel(current.id, "user")

    def cancel(self, job_id: str, reason: CancelReason) -> None:
        entry = self._running.get(job_id)
        if entry is None or job_id in self._cancel_reasons:
            return
        self._cancel_reasons[job_id] = reason
        if job_id in self._streaming:
            entry[1].cancel()

    async def drain(self, grace: float) -> None:
        """Stops claiming, lets running attempts finish within `grace`, hands the rest back."""
        self._claiming = False
        self._wake.set()
        if self._loops:
            # A claim under way finishes first, so no job it takes is left behind unseen.
            await asyncio.wait(self._loops[:1], timeout=10.0)
        # So do creates that claim for this replica (each is one database call): a job one claimed runs (settle).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_slots.wait(), timeout=10.0)
        tasks = [task for _, task in self._running.values()]
        if tasks:
            log.info("draining", in_flight=len(tasks), grace_seconds=grace)
            _, still_running = await asyncio.wait(tasks, timeout=grace)
            if still_running:
                log.info("grace period over; handing back what still runs", jobs=len(still_running))
                for job_id in list(self._running):
                    self.cancel(job_id, "shutdown")
                _, still_running = await asyncio.wait(still_running, timeout=self._config.handback_seconds)
            if still_running:
                # Still writing a hand-back or an outcome that the database does not take (it is away, and its
                # writes retry for write_patience_seconds). Nothing of this dispatcher may outlive the drain:
                # the pool closes next, and in a process that goes on (tests, an embedding app) such a task
                # would keep retrying into it. The writes are fenced, so stopping one mid-way is safe; the
                # lease decides what becomes of its job, as after a crash. "lost" writes nothing more.
                log.warning(
                    "attempts still writing after the drain; leaving them to their leases", jobs=len(still_running)
                )
                for job_id, (_, task) in list(self._running.items()):
                    self._cancel_reasons[job_id] = "lost"
                    task.cancel()
                await asyncio.wait(still_running, timeout=self._config.handback_seconds)
        checks = [*self._loops, *self._cancel_checks.values()]
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    async def _claim_loop(self) -> None:
        backoff = self._config.poll_interval
        while self._claiming:
            # Cleared before the claim, not after: a NOTIFY that lands while the claim query runs (too
            # late for its snapshot) must still wake the next round, not wait for the poll tick.
            self._wake.clear()
            try:
                claimed = await self._claim_once()
                backoff = self._config.poll_interval
            except CONNECTION_ERRORS as exc:
                log.warning("claim failed; will retry", error=str(exc) or type(exc).__name__)
                claimed = 0
                backoff = min(backoff * 2, 10.0)
            except Exception:
                log.exception("claim failed unexpectedly; will retry")
                claimed = 0
                backoff = min(backoff * 2, 10.0)
            if claimed and len(self._running) < self._config.max_in_flight:
                continue  # there may be more due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)

    async def _claim_once(self) -> int:
        room = self._room
        if room <= 0 or not self._claiming:
            return 0
        size = min(room, self._claim_size)
        jobs = await self._store.claim(self._config.owner, size, self._config.lease_seconds)
        # A full claim means more is due: the next one takes twice as many, so a burst is claimed in a few
        # rounds instead of lagging behind the creates by seconds while the event loop is busy with them
        # (measured: 2,000 jobs at once were claimed up to 5 s after they were created, 32 at a time).
        full = len(jobs) == size
        self._claim_size = min(self._claim_size * 2, MAX_CLAIM_BATCH) if full else self._config.claim_batch
        for job in jobs:
            self._start(job)
        return len(jobs)

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._running[job.id] = (job, task)
        task.add_done_callback(functools.partial(self._forget, job.id))

    def _forget(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._cancel_reasons.pop(job_id, None)
        self._streaming.discard(job_id)
        # Room for one more matters only to a claimer that stopped for want of room. One that stopped for want
        # of due jobs is woken by their NOTIFY (or its poll), not by every job that ends: that was one empty
        # claim, a database round trip, per job.
        if self._room == 1:
            self._wake.set()

    async def _lease_loop(self) -> None:
        interval = self._config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._reap()
            except CONNECTION_ERRORS as exc:
                log.warning("lease upkeep failed; will retry", error=str(exc) or type(exc).__name__)
            except Exception:
                log.exception("lease upkeep failed unexpectedly; will retry")

    async def _expiry_loop(self) -> None:
        """Ends the jobs past their start deadline that never started. Every replica runs it: SKIP LOCKED keeps
        them off each other's jobs, and the claim itself never takes such a job, so a late sweep only delays
        the EXPIRED state, never lets the job run."""
        while True:
            await asyncio.sleep(self._config.expiry_interval)
            try:
                while len(await self._store.expire_due(self._config.expiry_batch)) == self._config.expiry_batch:
                    pass
            except CONNECTION_ERRORS as exc:
                log.warning("expiry sweep failed; will retry", error=str(exc) or type(exc).__name__)
            except Exception:
                log.exception("expiry sweep failed unexpectedly; will retry")

    async def _renew(self) -> None:
        held = [(job.id, job.attempt) for job, _ in self._running.values()]
        still = await self._store.renew_leases(self._config.owner, held, self._config.lease_seconds)
        for job_id, _ in held:
            if job_id not in still:
                # Only an attempt whose stream is open still counts on its lease. One that is past it has
                # written (or is writing, fenced) its outcome, so the job has simply left `generating`: in a
                # burst of 500 quick jobs, 35 such were reported as lost leases.
                if job_id in self._streaming:
                    log.warning("lease lost; abandoning the attempt", job_id=job_id)
                    self.cancel(job_id, "lost")
            elif still[job_id]:
                self.cancel(job_id, "user")  # a cancel whose NOTIFY we missed

    async def _reap(self) -> None:
        """Returns jobs whose worker vanished (lease ran out) to pending, or ends them."""
        for job in await self._store.expired_leases(limit=100):
            if job.id in self._running:
                continue  # ours: the renewal that failed will succeed again or lose it
            if job.cancel_requested:
                change = StateChange.cancelled("cancelled while its worker was gone")
            elif job.failed_attempts + 1 >= job.max_attempts:
                message = "the worker running the last attempt stopped responding"
                change = StateChange.failed("LEASE_EXPIRED", message, count_failure=True)
            else:
                change = StateChange.lease_expired(f"worker {job.lease_owner} stopped responding")
            # Only if the lease is still out when the write lands: its owner may have renewed it meanwhile.
            updated = await self._advance(job, change, only_if_lease_expired=True)
            await self._cancel_if_requested(updated)
            if updated is not None:
                log.warning(
                    "lease expired", job_id=job.id, attempt=job.attempt, owner=job.lease_owner, now=updated.status
                )

    async def _advance(self, job: Job, change: StateChange, *, only_if_lease_expired: bool = False) -> Job | None:
        """A write for `job`'s attempt, fenced: it lands only while this attempt still holds the job."""
        return await self._store.advance(
            job.id, change, attempt=job.attempt, from_states=GENERATING, only_if_lease_expired=only_if_lease_expired
        )

    async def _write(self, job: Job, change: StateChange) -> Job | None:
        """One fenced write of the attempt that rides out a database outage (see _write_batch)."""
        written = await self._write_batch(job, [change])
        return written[-1] if written else None

    async def _write_batch(self, job: Job, batch: Sequence[StateChange]) -> list[Job]:
        """Fenced writes of the attempt, in order and in one transaction, that ride out a database outage.

        Returns the job after each write that landed: fewer than `batch` means the fence refused the next
        one (and nothing after it was written). Retried until it lands or is fenced out; after
        write_patience_seconds the error propagates and the lease decides. A transaction whose connection
        broke may have committed all the same: an image is looked for before it is written again, so it is
        never appended (and charged) twice; every other write of an attempt is refused by the fence the
        second time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.write_patience_seconds
        delay = 0.1
        retrying = False
        images = [change.image for change in batch if change.image is not None]
        while True:
            try:
                if retrying and images:
                    current = await self._store.get_job(job.id)
                    if current is None or current.attempt != job.attempt or current.status is not JobState.GENERATING:
                        return []
                    # One transaction: either every write of the batch landed or none did.
                    if any(stored.storage_path == images[0].storage_path for stored in current.images):
                        return [current] * len(batch)
                if len(batch) == 1:
                    updated = await self._advance(job, batch[0])
                    return [updated] if updated is not None else []
                return await self._store.advance_batch(job.id, batch, attempt=job.attempt, from_states=GENERATING)
            except CONNECTION_ERRORS as exc:
                if loop.time() + delay > deadline:
                    raise
                log.warning(
                    "database write failed; retrying",
                    job_id=job.id,
                    job_event=",".join(change.event.value for change in batch),
                    error=str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                retrying = True

    async def _cancel_if_requested(self, job: Job | None) -> None:
        """A job sent back to pending while a cancel was requested ends cancelled instead of running again."""
        if job is not None and job.status is JobState.PENDING and job.cancel_requested:
            await self._store.advance(
                job.id, StateChange.cancelled(), attempt=job.attempt, from_states=(JobState.PENDING,)
            )

    async def _run(self, job: Job) -> None:
        failure: GenerationFailure | None = None
        try:
            try:
                await self._attempt(job)
                return
            except asyncio.CancelledError:
                if job.id not in self._cancel_reasons:
                    raise  # not ours: the process is going down
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            except GenerationFailure as exc:
                failure = exc
            except CONNECTION_ERRORS:
                raise
            except Exception:
                log.exception("attempt crashed", job_id=job.id)
                failure = GenerationFailure("INTERNAL", "internal error in JobService", retryable=True)
            finally:
                self._streaming.discard(job.id)
            # A cancel beats a retry: the user asked for the job to end.
            reason = self._cancel_reasons.get(job.id)
            if reason is not None:
                await self._after_cancel(job, reason)
            elif failure is not None:
                await self._after_failure(job, failure)
        except CONNECTION_ERRORS as exc:
            # The lease runs out and another attempt starts; nothing here can be trusted to land.
            log.warning(
                "database unavailable during attempt; leaving it to the lease",
                job_id=job.id,
                error=str(exc) or type(exc).__name__,
            )

    async def _attempt(self, job: Job) -> None:
        self._streaming.add(job.id)
        if job.id in self._cancel_reasons:
            raise asyncio.CancelledError  # cancelled before the stream opened
        if job.images_owed == 0:
            # Earlier attempts delivered every image (the last one ended before its completion landed: its stream
            # broke, or its lease ran out). They stay the job's, so there is nothing to ask the generator for.
            self._streaming.discard(job.id)
            await self._write(job, StateChange.completed(f"{len(job.images)} delivered by earlier attempts"))
            return
        # The stream is read by a task of its own into a queue, and every write takes all that is queued at
        # that moment into one transaction: the events that arrive while one write runs (a zero-latency
        # provider's images and completion come within milliseconds) share the next commit. A lone event is
        # written at once. aclosing: leaving early (a cancel, a fenced write) closes the stream at once, which
        # cancels the Generate call and with it the provider request, instead of whenever it is collected.
        queue: Mailbox[_Read] = Mailbox()
        owed = _Owed(job.images_owed)
        async with contextlib.aclosing(self._generator.generate(job)) as events:
            reader = asyncio.create_task(_read_stream(events, queue), name=f"generate-{job.id}")
            try:
                while True:
                    batch = await queue.get_all()
                    if isinstance(batch[-1], ImageStored):
                        batch += await self._what_follows_an_image(queue)
                    if await self._write_events(job, batch, owed):
                        return
            finally:
                # The reader stops before the stream is closed (an async generator cannot be closed while
                # another task is inside it).
                reader.cancel()
                await asyncio.wait([reader])

    async def _what_follows_an_image(self, queue: Mailbox[_Read]) -> list[_Read]:
        """What arrives within image_linger_seconds, up to the first thing that is not an image."""
        more: list[_Read] = []
        deadline = asyncio.get_running_loop().time() + self._config.image_linger_seconds
        while came := await queue.get_all_within(deadline - asyncio.get_running_loop().time()):
            more += came
            if not isinstance(came[-1], ImageStored):
                break
        return more

    async def _write_events(self, job: Job, batch: list[_Read], owed: _Owed) -> bool:
        """Writes what the stream delivered, in one transaction; True when the attempt is over.

        An image past what the attempt asked for is not written: every delivered image is charged, and a job
        never delivers more than sample_count, whatever a provider answers.
        """
        writes: list[StateChange] = []
        done: GenerationCompleted | None = None
        end: _Read = _NOTHING
        for item in batch:
            if isinstance(item, GenerationStarted):
                writes.append(StateChange.generation_started(item.provider))
            elif isinstance(item, ImageStored):
                if owed.left <= 0:
                    log.warning(
                        "image beyond what the attempt asked for; not delivered",
                        job_id=job.id,
                        attempt=job.attempt,
                        storage_path=item.image.storage_path,
                    )
                    continue
                owed.left -= 1
                writes.append(StateChange.image_stored(item.image))
            elif isinstance(item, GenerationCompleted):
                done = item
                message = f"{item.delivered_count} delivered, {item.filtered_count} filtered" + (
                    f", {len(job.images)} delivered by earlier attempts" if job.images else ""
                )
                writes.append(
                    StateChange.completed(
                        message, filtered_count=item.filtered_count, filtered_reasons=item.filtered_reasons
                    )
                )
            else:
                end = item  # the stream failed or ended: always the last thing read
        if done is not None:
            self._streaming.discard(job.id)  # from here on, the outcome is being written
        if writes:
            written = await self._write_batch(job, writes)
            if done is not None:
                if len(written) < len(writes):
                    log.warning("completion fenced out", job_id=job.id, attempt=job.attempt)
                return True
            if len(written) < len(writes):
                log.warning("attempt fenced out; stopping it", job_id=job.id, attempt=job.attempt)
                return True
        if isinstance(end, BaseException):
            raise end
        if end is _ENDED:
            raise GenerationFailure("STREAM_ENDED", "the generator ended the stream without completing", retryable=True)
        return False

    async def _after_failure(self, job: Job, failure: GenerationFailure) -> None:
        decision = after_failure(job, failure, self._config.retry_base_seconds, self._config.retry_max_seconds)
        # The user reads a plain sentence for the reason (the job's error and the event); the generator's own
        # text, which quotes the provider (billing project and all), is for the log only.
        message = user_message(failure.reason)
        log.warning(
            "attempt failed; retry scheduled" if decision.delay is not None else "attempt failed; job failed",
            job_id=job.id,
            attempt=job.attempt,
            reason=failure.reason,
            retryable=failure.retryable,
            error=logged_detail(failure.message),
            retry_in_seconds=round(decision.delay, 2) if decision.delay is not None else None,
        )
        if decision.delay is not None:
            retry = StateChange.retry_scheduled(
                failure.reason, message, delay=decision.delay, count_failure=decision.count_failure
            )
            await self._cancel_if_requested(await self._write(job, retry))
        else:
            await self._write(job, StateChange.failed(failure.reason, message, count_failure=decision.count_failure))

    async def _after_cancel(self, job: Job, reason: CancelReason) -> None:
        if reason == "user":
            await self._write(job, StateChange.cancelled())
        elif reason == "shutdown":
            message = f"handed back: worker {self._config.owner} is shutting down (shutdown)"
            await self._cancel_if_requested(await self._write(job, StateChange.handed_back(message)))
