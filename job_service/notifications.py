"""One LISTEN connection per process, fanned out to every WatchJob stream and to the dispatcher.

Watchers never hold a database connection: a job's watchers share one feed, which on each NOTIFY
reads the new events once (job row and events from one snapshot) and hands them to every watcher.
After the LISTEN connection is lost and re-established, every feed re-reads what it may have
missed, so a watcher never skips an event.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from job_service.domain import EventType, Job, JobEvent
from job_service.store import NOTIFY_CHANNEL, JobStore

log = structlog.get_logger(__name__)

Update = tuple[Job, JobEvent]


@dataclass
class _Feed:
    job_id: str
    queues: set[asyncio.Queue[Update]] = field(default_factory=set)
    last_seq: int | None = None  # None until the first watcher has read its snapshot
    wanted_seq: int = 0
    task: asyncio.Task[None] | None = None


class Subscription:
    """One watcher's view of a feed: updates arrive on `queue`, in seq order."""

    def __init__(self, hub: JobNotifications, feed: _Feed) -> None:
        self._hub = hub
        self._feed = feed
        self.queue: asyncio.Queue[Update] = asyncio.Queue()

    def start_from(self, seq: int) -> None:
        """Called with the seq of the snapshot the watcher read after subscribing."""
        self._hub._start_feed(self._feed, seq)

    def close(self) -> None:
        self._hub._unsubscribe(self._feed, self.queue)


class JobNotifications:
    def __init__(
        self,
        dsn: str,
        store: JobStore,
        *,
        on_event: Callable[[str, int, EventType | None], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
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

    def subscribe(self, job_id: str) -> Subscription:
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed(job_id)
        subscription = Subscription(self, feed)
        feed.queues.add(subscription.queue)
        return subscription

    def _unsubscribe(self, feed: _Feed, queue: asyncio.Queue[Update]) -> None:
        feed.queues.discard(queue)
        if not feed.queues:
            if feed.task:
                feed.task.cancel()
            if self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]

    def _start_feed(self, feed: _Feed, seq: int) -> None:
        if feed.last_seq is None:
            feed.last_seq = seq
        self._poke(feed)

    def _poke(self, feed: _Feed) -> None:
        if feed.last_seq is not None and (feed.task is None or feed.task.done()):
            feed.task = asyncio.create_task(self._pump(feed), name=f"feed-{feed.job_id}")

    async def _pump(self, feed: _Feed) -> None:
        """Reads events past last_seq until it has caught up with every notified seq."""
        backoff = 0.05
        while feed.queues and feed.last_seq is not None and feed.last_seq < feed.wanted_seq:
            try:
                job, events = await self._store.job_and_events_after(feed.job_id, feed.last_seq)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("feed read failed; retrying", job_id=feed.job_id, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if job is None:
                return
            for event in events:
                for queue in feed.queues:
                    queue.put_nowait((job, event))
                feed.last_seq = event.seq
            # A notification can be for a seq not committed yet when it arrives: never spin on it.
            feed.wanted_seq = max(feed.last_seq, min(feed.wanted_seq, job.last_event_seq))

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        job_id, _, rest = payload.partition(":")
        seq_text, _, event_text = rest.partition(":")
        try:
            seq = int(seq_text)
        except ValueError:
            return
        event = EventType(event_text) if event_text in EventType.__members__.values() else None
        if self._on_event is not None:
            self._on_event(job_id, seq, event)
        feed = self._feeds.get(job_id)
        if feed is not None:
            feed.wanted_seq = max(feed.wanted_seq, seq)
            self._poke(feed)

    def _resync_all(self) -> None:
        for feed in self._feeds.values():
            # Unknown what was missed while disconnected: read whatever is newer than last_seq.
            feed.wanted_seq = max(feed.wanted_seq, (feed.last_seq or 0) + 1)
            self._poke(feed)

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, statement_cache_size=0)
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
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the connection: reconnect with backoff
                log.warning("job notifications connection lost", error=str(exc) or type(exc).__name__)
            finally:
                self.connected.clear()
                if self._on_connection_change:
                    self._on_connection_change(False)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not self._stopping.is_set():
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 10.0)
