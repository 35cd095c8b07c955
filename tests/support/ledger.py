"""The money invariants, checked straight against the tables."""

from __future__ import annotations

import asyncpg


async def assert_credits_consistent(conn: asyncpg.Connection) -> None:
    """balance == sum(ledger) per account; each job reserved once, and settled once iff it has ended."""
    mismatched = await conn.fetch(
        """SELECT a.user_id, a.balance, coalesce(sum(l.amount), 0) AS ledger
           FROM credit_accounts a LEFT JOIN credit_ledger l ON l.user_id = a.user_id
           GROUP BY a.user_id, a.balance HAVING a.balance <> coalesce(sum(l.amount), 0)"""
    )
    assert not mismatched, f"balance != sum(ledger) for {[dict(r) for r in mismatched]}"
    unsettled = await conn.fetch(
        """SELECT j.id, j.status,
                  count(*) FILTER (WHERE l.kind = 'reserve') AS reserves,
                  count(*) FILTER (WHERE l.kind = 'release') AS releases,
                  count(*) FILTER (WHERE l.kind = 'capture') AS captures,
                  coalesce(sum(-l.amount) FILTER (WHERE l.kind = 'capture'), 0) AS captured,
                  j.credits_charged
           FROM generation_jobs j LEFT JOIN credit_ledger l ON l.job_id = j.id
           GROUP BY j.id
           HAVING count(*) FILTER (WHERE l.kind = 'reserve') <> 1
               OR count(*) FILTER (WHERE l.kind = 'release')
                  <> CASE WHEN j.status IN ('completed', 'failed', 'cancelled', 'expired') THEN 1 ELSE 0 END
               OR count(*) FILTER (WHERE l.kind = 'capture')
                  <> CASE WHEN j.status IN ('completed', 'failed', 'cancelled', 'expired') THEN 1 ELSE 0 END
               OR coalesce(sum(-l.amount) FILTER (WHERE l.kind = 'capture'), 0) <> j.credits_charged"""
    )
    assert not unsettled, f"jobs whose credits are not settled exactly once: {[dict(r) for r in unsettled]}"
