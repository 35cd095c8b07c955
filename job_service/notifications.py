"""One LISTEN connection per process, fanned out to every WatchJob stream and to the dispatcher.

Watchers never hold a database connection: a job's watchers share one feed, which on each NOTIFY
reads the new events once (job row and events from one snapshot) and hands them to every watcher.
After the LISTEN connection is lost and re-established, every feed re-reads what it may have
missed, so a watcher never skips an event.

Events this process writes itself (its dispatcher runs the job) are handed to its watchers as soon as
the write answers (`publish`, from job_service.fanout.EventFanout); a NOTIFY that finds every watcher
already there, or this process's write to the job still under way (EventFanout.write_in_flight), reads
nothing. A watcher only ever takes the next seq, so a published event never jumps a gap; whatever is
missing is read as before.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
import structlog

from job_service.domain import Job, JobEvent, JobEventType
from job_service.mailbox import Mailbox
from job_service.store import NOTIFY_CHANNEL

log = structlog.get_logger(__name__)

Update = tuple[Job, JobEvent]


class EventReads(Protocol):
    """The one read the feeds make (job_service.store.JobStore)."""

    async def job_and_events_after(self, job_id: str, seq: int) -> tuple[Job | None, list[JobEvent]]: ...


class WritesInFlight(Protocol):
    """This process's writes under way (job_service.fanout.EventFanout)."""

    def write_in_flight(self, job_id: str) -> asyncio.Event | None: ...


@dataclass(eq=False)
class _Feed:
    job_id: str
    subscriptions: set[Subscription] = field(default_factory=set)
    # Set by every NOTIFY for the job (and after a reconnect): something newer may be committed.
    stale: bool = False
    # The highest seq NOTIFY announced: a read is only needed while some watcher is behind it...
    announced_seq: int = 0
    # ...unless what is committed is unknown (a watcher's snapshot was just taken, the LISTEN
    # connection came back, a read failed, a published event found a gap).
    must_read: bool = False
    task: asyncio.Task[None] | None = None


class Subscription:
    """One watcher's view of a feed: updates arrive on `queue`, contiguous in seq from its snapshot."""

    def __init__(self, hub: JobNotifications, feed: _Feed) -> None:
        self._hub = hub
        self._feed = feed
        self.queue: Mailbox[Update] = Mailbox()
        # The seq of the last event this watcher has (its snapshot's, at first); None until started.
        self.last_seq: int | None = None

    def start_from(self, seq: int) -> None:
        """Called with the seq of the snapshot the watcher read after subscribing."""
        self.last_seq = seq
        # An event after the snapshot reaches this watcher when its NOTIFY arrives, unless the NOTIFY was handled
        # before now (the event read or published for the job's other watchers, this one skipped as not
        # started), or the feed owes a read it could not make without a started watcher (the LISTEN connection
        # came back): then one read from this watcher's seq settles it. Otherwise nothing is read.
        if self._feed.must_read or self._feed.announced_seq > seq:
            self._hub._mark_stale(self._feed, must_read=True)

    def close(self) -> None:
        self._hub._unsubscribe(self._feed, self)


class JobNotifications:
    def __init__(
        self,
        dsn: str,
        store: EventReads,
        *,
        writes: WritesInFlight | None = None,
        on_event: Callable[[str, int, JobEventType | None], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._writes = writes
        self._on_event = on_event
        self._on_connection_change = on_connection_change
        self._feeds: dict[str, _Feed] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="listen")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for feed in list(self._feeds.values()):
            if feed.task:
                feed.task.cancel()

    def watched_jobs(self) -> int:
        """Jobs with a watcher: each has a feed, kept only while one of its watchers is open."""
        return len(self._feeds)

    def subscribe(self, job_id: str) -> Subscription:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed(job_id)
        subscription = Subscription(self, feed)
        feed.subscriptions.add(subscription)
        return subscription

    def _unsubscribe(self, feed: _Feed, subscription: Subscription) -> None:
        feed.subscriptions.discard(subscription)
        if not feed.subscriptions:
            if feed.task:
                feed.task.cancel()
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]

    def publish(self, job: Job, event: JobEvent) -> None:
        """An event this process just committed: to every watcher whose next event it is."""
        feed = self._feeds.get(job.id)
        if feed is None:
            return
        behind = False
        for subscription in feed.subscriptions:
            if subscription.last_seq is None:
                continue  # not started: its snapshot and the read after it cover this event
            if subscription.last_seq == event.seq - 1:
                subscription.queue.put((job, event))
                subscription.last_seq = event.seq
            elif subscription.last_seq < event.seq - 1:
                behind = True  # an earlier event (another replica's, say) is not here yet
        if behind:
            self._mark_stale(feed, must_read=True)

    def _mark_stale(self, feed: _Feed, *, must_read: bool = False) -> None:
        feed.stale = True
        feed.must_read = feed.must_read or must_read
        if feed.task is None or feed.task.done():
            feed.task = asyncio.create_task(self._pump(feed), name=f"feed-{feed.job_id}")

    async def _pump(self, feed: _Feed) -> None:
        try:
            await self._read_while_stale(feed)
        finally:
            # A finished task holds its coroutine, and the feed would hold the task until the job's next
            # NOTIFY: about 1 kB for every job in flight.
            if feed.task is asyncio.current_task():
                feed.task = None

    async def _read_while_stale(self, feed: _Feed) -> None:
        """Reads what is new for the feed's watchers until no notification is left unread.

        NOTIFY is delivered only after its transaction commits, so a notification that arrives while a
        read is under way marks the feed stale again and causes one more read: none is lost, and none
        makes the pump spin. Each read starts at the oldest seq any started watcher has, and one read
        returns every event after it from one snapshot, so each watcher gets its events without a gap.
        """
        backoff = 0.05
        while feed.stale and feed.subscriptions:
            started = [s for s in feed.subscriptions if s.last_seq is not None]
            if not started:
                return  # still stale, and must_read kept: start_from reads if a read is owed
            feed.stale = False
            since = min(s.last_seq for s in started if s.last_seq is not None)
            if not feed.must_read:
                if since >= feed.announced_seq:
                    continue  # every watcher already has what was announced (published by this process)
                writing = self._writes.write_in_flight(feed.job_id) if self._writes is not None else None
                if writing is not None:
                    # This process is writing to the job, and the NOTIFY of its commit beat the write's
                    # own answer, which brings the same events: wait for it, then look again.
                    await writing.wait()
                    feed.stale = True
                    continue
            feed.must_read = False
            try:
                job, events = await self._store.job_and_events_after(feed.job_id, since)
            except Exception as exc:  # the database is away: read again once it is back
                feed.stale = feed.must_read = True
                log.warning("feed read failed; retrying", job_id=feed.job_id, error=str(exc) or type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if job is None:
                return
            for subscription in started:
                if subscription not in feed.subscriptions or subscription.last_seq is None:
                    continue
                for event in events:
                    if event.seq > subscription.last_seq:
                        subscription.queue.put((job, event))
                        subscription.last_seq = event.seq

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        job_id, _, rest = payload.partition(":")
        seq_text, _, event_text = rest.partition(":")
        try:
            seq = int(seq_text)
        except ValueError:
            return
        event = JobEventType(event_text) if event_text in JobEventType.__members__.values() else None
        if self._on_event is not None:
            self._on_event(job_id, seq, event)
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.announced_seq = max(feed.announced_seq, seq)
            self._mark_stale(feed)

    def _resync_all(self) -> None:
        # Unknown what was missed while disconnected: every feed reads whatever is newer.
        for feed in list(self._feeds.values()):
            self._mark_stale(feed, must_read=True)

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, statement_cache_size=0, timeout=10.0)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                self.connected.set()
                if self._on_connection_change:
                    self._on_connection_change(True)
                log.info("listening for job notifications")
                backoff = 0.2
                self._resync_all()
                if self._on_event is not None:
                    self._on_event("", 0, None)  # the dispatcher may have missed wake-ups too
                while not lost.is_set():
                    # A dead TCP peer does not always close the socket: ask the server now and then.
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=5.0)
                    except TimeoutError:
                        await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5.0)
                log.warning("job notifications connection lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: reconnect with backoff
                log.warning("job notifications connection failed", error=str(exc) or type(exc).__name__)
            finally:
                self.connected.clear()
                if self._on_connection_change:
                    self._on_connection_change(False)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not self._stopping.is_set():
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)
