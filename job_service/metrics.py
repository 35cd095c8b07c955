"""JobService's metrics: job transitions and credits counted where they happen, the queue read on scrape.

Counters are per replica (sum them across replicas): every transition and every credit movement goes through
a JobStore write that this replica made, so `InstrumentedJobStore` counts it (and logs it, one line per
transition) right after the write succeeds. Queue gauges describe the shared database, so every replica
reports the same values (take max, not sum); they are read with one small query when /metrics is scraped.
"""

from __future__ import annotations

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from job_service.cleanup import CleanupStore
from job_service.domain import Job, JobEvent, JobEventType, JobState
from job_service.queries import queries
from job_service.store import CommittedEvents, JobStore
from job_service.webhook_sender import WebhookMetricsSink
from job_service.webhook_store import WebhookStore

log = structlog.get_logger("job_service.transitions")

ACTIVE_STATES = (JobState.PENDING, JobState.GENERATING)
CREDIT_KINDS = ("reserved", "captured", "released")
_PROGRESS_EVENTS = frozenset({JobEventType.GENERATION_STARTED.value, JobEventType.IMAGE_STORED.value})


def _transition_details(job: Job, event: str) -> dict[str, object]:
    """What an operator asks about a job at this transition, beyond the ids and the state."""
    if event == JobEventType.CREATED.value:
        return {"model": job.model, "images": job.params.sample_count, "reserved": job.credits_reserved}
    if job.status is JobState.COMPLETED:
        return {"delivered": len(job.images), "filtered": job.filtered_count, "charged": job.credits_charged}
    if job.error_code and event in (JobEventType.FAILED.value, JobEventType.RETRY_SCHEDULED.value):
        return {"reason": job.error_code}
    return {}


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._sql = queries()
        self.transitions = Counter(
            "imagegen_job_transitions",
            "Job events written by this replica, by event and the state the job is in after it.",
            ["event", "state"],
            registry=registry,
        )
        self.credits = Counter(
            "imagegen_credits",
            "Credits moved by this replica: reserved at CreateJob, released (all of the reservation) and "
            "captured (what was delivered) when the job ends.",
            ["kind"],
            registry=registry,
        )
        for kind in CREDIT_KINDS:
            self.credits.labels(kind)
        self.jobs = Gauge(
            "imagegen_jobs",
            "Active jobs in the database (all replicas) by state.",
            ["state"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "imagegen_queue_depth",
            "Pending jobs that are due now, waiting for a worker (all replicas).",
            registry=registry,
        )
        self.queue_oldest_age = Gauge(
            "imagegen_queue_oldest_age_seconds",
            "Age of the oldest pending job (since it was created); 0 when none is pending.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "imagegen_dispatcher_in_flight", "Attempts this replica is running right now.", registry=registry
        )
        self.cleanup_deleted = Counter(
            "imagegen_storage_cleanup_objects_deleted",
            "Objects this replica's storage sweeper had the generator delete (orphans of ended jobs).",
            registry=registry,
        )
        self.cleanup_failures = Counter(
            "imagegen_storage_cleanup_failures",
            "Sweeps of a job's folder by this replica that failed (the row stays and is retried with backoff).",
            registry=registry,
        )
        self.cleanups_waiting = Gauge(
            "imagegen_storage_cleanups_waiting",
            "Job folders still to be swept (storage_cleanups rows, all replicas), due or not.",
            registry=registry,
        )

        self.retention_images_expired = Counter(
            "imagegen_retention_images_expired",
            "Jobs whose images this replica's retention pass queued for deletion (JOB_IMAGE_RETENTION_DAYS).",
            registry=registry,
        )
        self.retention_jobs_deleted = Counter(
            "imagegen_retention_jobs_deleted",
            "Job rows (with their events) this replica deleted after their objects were gone, by why: retention "
            "(JOB_JOB_RETENTION_DAYS) or delete_job (DeleteJob).",
            ["reason"],
            registry=registry,
        )

    # RetentionObserver (job_service.retention).
    def images_expired(self, count: int) -> None:
        self.retention_images_expired.inc(count)

    def jobs_deleted(self, reason: str, count: int) -> None:
        self.retention_jobs_deleted.labels(reason).inc(count)

    # SweepObserver (job_service.cleanup): what the sweeper reports as it goes.
    def objects_deleted(self, count: int) -> None:
        self.cleanup_deleted.inc(count)

    def sweep_failed(self) -> None:
        self.cleanup_failures.inc()

    async def refresh_cleanups(self, cleanups: CleanupStore) -> None:
        self.cleanups_waiting.set(await cleanups.waiting())

    def transition(self, job: Job, event: JobEvent) -> None:
        """`event` was just written; `job` is as the write left it (for a job claimed as it was created, already
        generating when its 'created' event comes here, so the state is the event's)."""
        name = event.type.value
        self.transitions.labels(name, event.status.value).inc()
        # The one log line per transition (nothing else logs the lifecycle). Progress inside an attempt is
        # DEBUG: the events table and WatchJob have it, and at INFO it would be most of a job's lines.
        line = log.debug if name in _PROGRESS_EVENTS else log.info
        line(
            "job transition",
            job_id=job.id,
            user_id=job.user_id,
            job_event=name,
            state=event.status.value,
            attempt=event.attempt,
            **_transition_details(job, name),
        )

    async def refresh_queue(self, pool: asyncpg.Pool) -> None:
        """One indexed query over the active jobs."""
        rows = await pool.fetch(self._sql["job_queue_stats"])
        by_state = {row["status"]: row for row in rows}
        for state in ACTIVE_STATES:
            row = by_state.get(state.value)
            self.jobs.labels(state.value).set(row["jobs"] if row else 0)
        pending = by_state.get(JobState.PENDING.value)
        self.queue_depth.set(pending["due"] if pending else 0)
        self.queue_oldest_age.set(max(0.0, pending["oldest"]) if pending else 0.0)


class InstrumentedJobStore(JobStore):
    """A JobStore that counts and logs every transition it writes, and the credits each one moves."""

    def __init__(self, pool: asyncpg.Pool, metrics: JobMetrics, events: CommittedEvents | None = None) -> None:
        super().__init__(pool, events)
        self._metrics = metrics

    def _committed(self, job: Job, event: JobEvent) -> None:
        # Every event this store commits passes here once (an idempotent replay of CreateJob is not one).
        self._metrics.transition(job, event)
        super()._committed(job, event)

    def _created(self, job: Job) -> None:
        # Only a create that made its job reserved credits: the database says so in the create's own round trip.
        self._metrics.credits.labels("reserved").inc(job.credits_reserved)

    def _settled(self, job: Job, released: int) -> None:
        self._metrics.credits.labels("released").inc(released)
        self._metrics.credits.labels("captured").inc(job.credits_charged)


class WebhookMetrics(WebhookMetricsSink):
    """Webhook sends and their ends, counted by the replica that made them (sum across replicas); the queue read
    on scrape describes the shared database (take max)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "imagegen_webhook_attempts",
            "Webhook sends by this replica, by outcome: delivered (2xx), http_error (any other status), timeout, "
            "network_error (refused, reset, TLS, DNS), refused (the host resolves to a forbidden address), "
            "internal_error (a fault of the service's own).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("delivered", "http_error", "timeout", "network_error", "refused", "internal_error"):
            self.attempts.labels(outcome)
        self.deliveries = Counter(
            "imagegen_webhook_deliveries",
            "Webhook deliveries this replica ended: delivered, or failed (given up).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("delivered", "failed"):
            self.deliveries.labels(outcome)
        self.send_seconds = Histogram(
            "imagegen_webhook_send_seconds",
            "How long one webhook send took (resolution, connection, request, the receiver's answer).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.delivery_delay = Histogram(
            "imagegen_webhook_delivery_delay_seconds",
            "From a job event to the end of its webhook delivery (delivered or given up).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
            registry=registry,
        )
        self.queue = Gauge(
            "imagegen_webhook_queue_depth",
            "Webhook deliveries not yet delivered or given up (all replicas).",
            registry=registry,
        )
        self.queue_due = Gauge(
            "imagegen_webhook_queue_due",
            "Pending webhook deliveries due now (all replicas).",
            registry=registry,
        )
        self.queue_oldest_age = Gauge(
            "imagegen_webhook_queue_oldest_age_seconds",
            "Age of the oldest pending webhook delivery; 0 when none is pending.",
            registry=registry,
        )

    def attempt(self, outcome: str, seconds: float) -> None:
        self.attempts.labels(outcome).inc()
        self.send_seconds.observe(seconds)

    def ended(self, state: str, seconds_since_event: float) -> None:
        self.deliveries.labels(state).inc()
        self.delivery_delay.observe(max(0.0, seconds_since_event))

    async def refresh_queue(self, store: WebhookStore) -> None:
        stats = await store.queue_stats()
        self.queue.set(stats["pending"])
        self.queue_due.set(stats["due"])
        self.queue_oldest_age.set(max(0.0, stats["oldest"]))
