"""PostgreSQL access for the webhook outbox (asyncpg; no gRPC).

Deliveries are queued by a trigger in the transaction of their event (migration 20261206000200); this module
claims due ones with a lease, records each send's result, and reads them back for ListWebhookDeliveries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from job_service.domain import Job
from job_service.queries import queries
from job_service.store import job_from_row

MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Delivery:
    """One queued delivery, as claimed: the job is the snapshot its event left."""

    id: str
    job_id: str
    seq: int
    type: str
    url: str
    job: Job
    event_at: datetime
    attempts: int  # including the send this claim starts
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    attempt: int
    at: datetime
    duration_seconds: float
    http_status: int | None
    error: str


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery and its sends, for ListWebhookDeliveries."""

    id: str
    seq: int
    type: str
    state: str
    attempts: list[Attempt]
    created_at: datetime
    ended_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str


@dataclass(frozen=True)
class Outcome:
    """What one send came to."""

    http_status: int | None
    error: str
    duration_seconds: float
    delivered: bool
    # Not delivered: None to give up now, else seconds until the next send.
    retry_in: float | None


def _snapshot(row: asyncpg.Record) -> Job:
    # The snapshot is to_jsonb(generation_jobs) as the event left it; populate_record typed it back.
    return job_from_row(row)


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._sql = queries()

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Delivery]:
        """Up to `limit` due deliveries, leased to `owner`: each the earliest of its job still pending (a job's
        next delivery waits until the one before is delivered or given up), skipping rows another replica holds."""
        if limit <= 0:
            return []
        rows = await self._pool.fetch(
            self._sql["webhook_claim"],
            owner,
            limit,
            lease_seconds,
        )
        return [
            Delivery(
                id=str(r["delivery_id"]),
                job_id=str(r["delivery_job_id"]),
                seq=r["delivery_seq"],
                type=r["delivery_type"],
                url=r["delivery_url"],
                job=_snapshot(r),
                event_at=r["event_at"],
                attempts=r["delivery_attempts"],
                created_at=r["delivery_created_at"],
            )
            for r in rows
        ]

    async def record(self, delivery: Delivery, owner: str, outcome: Outcome) -> str | None:
        """Records one send and moves the delivery on: 'delivered', 'failed' (given up) or back to 'pending' for
        `outcome.retry_in` seconds. Returns the new state, or None when this replica no longer held the delivery
        (its lease ran out and another replica took it over: the attempt is still recorded)."""
        if outcome.delivered:
            state = "delivered"
        elif outcome.retry_in is None:
            state = "failed"
        else:
            state = "pending"
        error = outcome.error[:MAX_ERROR_CHARS]
        row = await self._pool.fetchrow(
            self._sql["webhook_record"],
            delivery.id,
            delivery.attempts,
            outcome.duration_seconds,
            outcome.http_status,
            error,
            owner,
            state,
            outcome.retry_in or 0.0,
        )
        return None if row is None else str(row["state"])

    async def release(self, owner: str, delivery_ids: Sequence[str]) -> None:
        """Hands back deliveries whose sends this replica abandoned (shutdown): due again at once, anywhere."""
        if delivery_ids:
            await self._pool.execute(
                self._sql["webhook_release"],
                owner,
                list(delivery_ids),
            )

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable delivery is due (<= 0: now); None when none is pending.

        Only the earliest pending delivery of each job counts: the ones behind it are not claimable however
        overdue they are, and counting them would have a sender poll in a loop while the first waits to retry.
        """
        value = await self._pool.fetchval(self._sql["webhook_next_due_in"])
        return float(value) if value is not None else None

    async def for_job(self, job_id: str) -> list[DeliveryRecord]:
        rows = await self._pool.fetch(
            self._sql["webhook_deliveries_of_job"],
            job_id,
        )
        records = []
        for r in rows:
            attempts = [
                Attempt(n, at, duration, status, error)
                for n, at, duration, status, error in zip(
                    r["numbers"],
                    r["ats"] or (),
                    r["durations"] or (),
                    r["statuses"] or (),
                    r["errors"] or (),
                    strict=True,
                )
            ]
            records.append(
                DeliveryRecord(
                    id=str(r["id"]),
                    seq=r["seq"],
                    type=r["type"],
                    state=r["state"],
                    attempts=attempts,
                    created_at=r["created_at"],
                    ended_at=r["ended_at"],
                    next_attempt_at=r["next_attempt_at"] if r["state"] == "pending" else None,
                    last_error=r["last_error"] or "",
                )
            )
        return records

    async def queue_stats(self) -> dict[str, Any]:
        row = await self._pool.fetchrow(self._sql["webhook_queue_stats"])
        assert row is not None
        return dict(row)
