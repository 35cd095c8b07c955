"""Where a job event goes once it is known: one owner for the routing inside a JobService process.

Two kinds of news come in. An event this process committed (JobStore reports it, built from the row its write
returned) goes, in this order, to the local watchers (JobNotifications.publish: no read, no wait for the NOTIFY),
to the dispatcher (a new job to claim, a cancel to act on) and to the webhook sender (a delivery may have been
queued in the same transaction). A NOTIFY (any replica's commit, this one's included) goes to the dispatcher and
the webhook sender; JobNotifications itself reads it for the watchers. The NOTIFY of this process's own commit
still comes, and finds nothing left to do.

The fan-out also knows which of this process's writes are under way: the NOTIFY of a commit often reaches the LISTEN
connection before the write's own answer does, and a watcher's feed that sees the write still under way waits for
its publish instead of reading the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from job_service.domain import Job, JobEvent, JobEventType

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def _logged_fault(receiver: str, job: Job, event: JobEvent) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("delivering a committed event failed", receiver=receiver, job_id=job.id, seq=event.seq)


class Watchers(Protocol):
    def publish(self, job: Job, event: JobEvent) -> None: ...


class Runner(Protocol):
    """The dispatcher, as the fan-out tells it of events."""

    def on_committed(self, job: Job, event: JobEventType) -> None: ...

    def on_notification(self, job_id: str, seq: int, event: JobEventType | None) -> None: ...


class Wakeable(Protocol):
    def wake(self) -> None: ...


@dataclass
class _Writes:
    """This process's writes to one job that have not answered yet."""

    count: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class EventFanout:
    def __init__(self) -> None:
        self._writes: dict[str, _Writes] = {}
        self._watchers: Watchers | None = None
        self._runner: Runner | None = None
        self._webhooks: Wakeable | None = None

    def deliver_to(
        self, *, watchers: Watchers | None = None, runner: Runner | None = None, webhooks: Wakeable | None = None
    ) -> None:
        """Who hears of events from now on. Given after construction: the store takes the fan-out when it is built,
        and the dispatcher and the watchers' hub are built on that store."""
        self._watchers, self._runner, self._webhooks = watchers, runner, webhooks

    @contextlib.contextmanager
    def writing(self, job_id: str) -> Iterator[None]:
        """Around one write of this process to the job: from before it is sent until its events are delivered."""
        writes = self._writes.get(job_id)
        if writes is None:
            writes = self._writes[job_id] = _Writes()
        writes.count += 1
        try:
            yield
        finally:
            writes.count -= 1
            if writes.count == 0:
                del self._writes[job_id]
                writes.ended.set()

    def write_in_flight(self, job_id: str) -> asyncio.Event | None:
        """Set once this process's writes to the job now under way have answered (and been delivered)."""
        writes = self._writes.get(job_id)
        return writes.ended if writes is not None else None

    def committed(self, job: Job, event: JobEvent) -> None:
        """An event this process just committed, with the job as its write left it (once per event, in seq order).

        The write has committed whatever a receiver does: a receiver's fault is logged, not raised (the NOTIFY and
        a read still bring the event to the watchers).
        """
        # Each receiver on its own: one's fault must not keep the event from the others.
        if self._watchers is not None:
            with _logged_fault("watchers", job, event):
                self._watchers.publish(job, event)
        # Only the job's latest event concerns the dispatcher: the 'created' of a job claimed as it was created
        # (attempt_started came with it) must not wake a claim for a job that is no longer pending.
        if self._runner is not None and event.seq == job.last_event_seq:
            with _logged_fault("dispatcher", job, event):
                self._runner.on_committed(job, event.type)
        if self._webhooks is not None:
            with _logged_fault("webhooks", job, event):
                self._webhooks.wake()

    def notified(self, job_id: str, seq: int, event: JobEventType | None) -> None:
        """A NOTIFY from the database (any replica's commit), or after the LISTEN connection came back ("", 0,
        None: whatever was missed)."""
        if self._runner is not None:
            self._runner.on_notification(job_id, seq, event)
        if self._webhooks is not None:
            # Any replica's event may have queued a delivery (in its own transaction): look now, not at the poll.
            self._webhooks.wake()
