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

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Delivery]:
        """Up to `limit` due deliveries, leased to `owner`: each the earliest of its job still pending (a job's
        next delivery waits until the one before is delivered or given up), skipping rows another replica holds."""
        if limit <= 0:
            return []
        rows = await self._pool.fetch(
            """WITH due AS (
                   SELECT d.id FROM webhook_deliveries d
                   WHERE d.state = 'pending' AND d.next_attempt_at <= now()
                     AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())
                     AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                                     WHERE p.job_id = d.job_id AND p.state = 'pending' AND p.seq < d.seq)
                   ORDER BY d.next_attempt_at
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED
               ), claimed AS (
                   UPDATE webhook_deliveries d SET lease_owner = $1,
                       lease_expires_at = now() + make_interval(secs => $3), attempts = d.attempts + 1
                   FROM due WHERE d.id = due.id
                   RETURNING d.id AS delivery_id, d.job_id AS delivery_job_id, d.seq AS delivery_seq,
                             d.type AS delivery_type, d.url AS delivery_url, d.job AS snapshot, d.event_at,
                             d.attempts AS delivery_attempts, d.created_at AS delivery_created_at
               )
               SELECT c.*, s.* FROM claimed c
               CROSS JOIN LATERAL jsonb_populate_record(NULL::generation_jobs, c.snapshot) s""",
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
            """WITH attempt AS (
                   INSERT INTO webhook_attempts (delivery_id, attempt, duration_seconds, http_status, error, worker)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (delivery_id, attempt) DO NOTHING
               )
               UPDATE webhook_deliveries SET state = $7, last_status = $4, last_error = nullif($5, ''),
                   lease_owner = NULL, lease_expires_at = NULL,
                   next_attempt_at = CASE WHEN $7 = 'pending' THEN now() + make_interval(secs => $8)
                                          ELSE next_attempt_at END,
                   ended_at = CASE WHEN $7 = 'pending' THEN NULL ELSE now() END
               WHERE id = $1 AND state = 'pending' AND lease_owner = $6 AND attempts = $2
               RETURNING state""",
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
                """UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL
                   WHERE id = ANY($2::uuid[]) AND lease_owner = $1 AND state = 'pending'""",
                owner,
                list(delivery_ids),
            )

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest claimable delivery is due (<= 0: now); None when none is pending.

        Only the earliest pending delivery of each job counts: the ones behind it are not claimable however
        overdue they are, and counting them would have a sender poll in a loop while the first waits to retry.
        """
        value = await self._pool.fetchval(
            """SELECT extract(epoch FROM min(greatest(d.next_attempt_at,
                                                      coalesce(d.lease_expires_at, d.next_attempt_at))) - now())
               FROM webhook_deliveries d
               WHERE d.state = 'pending'
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                                 WHERE p.job_id = d.job_id AND p.state = 'pending' AND p.seq < d.seq)"""
        )
        return float(value) if value is not None else None

    async def for_job(self, job_id: str) -> list[DeliveryRecord]:
        rows = await self._pool.fetch(
            """SELECT d.id, d.seq, d.type, d.state, d.created_at, d.ended_at, d.next_attempt_at, d.last_error,
                      coalesce(array_agg(a.attempt ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL), '{}')
                          AS numbers,
                      array_agg(a.at ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS ats,
                      array_agg(a.duration_seconds ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL)
                          AS durations,
                      array_agg(a.http_status ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS statuses,
                      array_agg(a.error ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS errors
               FROM webhook_deliveries d LEFT JOIN webhook_attempts a ON a.delivery_id = d.id
               WHERE d.job_id = $1 GROUP BY d.id ORDER BY d.seq""",
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
        row = await self._pool.fetchrow(
            """SELECT count(*) AS pending, count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
                      coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest
               FROM webhook_deliveries WHERE state = 'pending'"""
        )
        assert row is not None
        return dict(row)
