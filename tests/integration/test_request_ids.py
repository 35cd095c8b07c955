"""Idempotency keys end to end: a call whose COMMIT happened but whose answer was lost, retried by the client library,
takes effect once. The answer is lost for real: a TCP proxy between the client and JobService lets the request
through and cuts the connection as the response starts back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import ImageGenClient
from imagegen_client.sync_client import ImageGenSyncClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.cutting_proxy import answer_cutting_proxy
from tests.support.ledger import assert_credits_consistent
from tests.support.rpc_errors import failure_of
from tests.support.services import new_user, running_services


async def grants(db: asyncpg.Connection, user: str) -> list[tuple[int, str]]:
    rows = await db.fetch("SELECT amount, reason FROM credit_ledger WHERE user_id = $1 AND kind = 'grant'", user)
    return [(r["amount"], r["reason"]) for r in rows]


async def test_a_grant_whose_answer_was_lost_is_retried_and_granted_once(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job={"new_user_credits": 0}) as services,
        answer_cutting_proxy(services.job.port) as proxy,
        ImageGenClient(proxy.target, mint_token(DEV_JWT_SECRET, service_role=True)) as admin,
    ):
        granted = await admin.grant_credits(user, 25, reason="lost answer")
        async with services.client(user) as owner:
            balance = await owner.credit_balance()

    assert proxy.cut == 1, "the first answer was lost, so the client had to retry"
    assert proxy.connections == 2
    assert await grants(db, user) == [(25, "lost answer")], "exactly one ledger row"
    assert granted.balance == 25 == balance.balance, "the balance was raised once"
    await assert_credits_consistent(db)


async def test_a_create_whose_answer_was_lost_is_retried_and_makes_one_job(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job={"max_in_flight": 0}) as services,
        answer_cutting_proxy(services.job.port) as proxy,
        ImageGenClient(proxy.target, mint_token(DEV_JWT_SECRET, user_id=user)) as client,
    ):
        job = await client.create_job("asked once", sample_count=2)

    assert proxy.cut == 1
    jobs = await db.fetch("SELECT id, request_id FROM generation_jobs WHERE user_id = $1", user)
    assert [str(r["id"]) for r in jobs] == [job.id], "one job, the one the retry answered with"
    assert jobs[0]["request_id"], "the client library sent a request_id"
    reserved = await db.fetchval("SELECT count(*) FROM credit_ledger WHERE user_id = $1 AND kind = 'reserve'", user)
    assert reserved == 1
    await assert_credits_consistent(db)


async def test_the_sync_client_retries_a_lost_grant_with_the_same_request_id(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job={"new_user_credits": 0}) as services,
        answer_cutting_proxy(services.job.port) as proxy,
    ):

        def grant() -> pb.GrantCreditsResponse:
            with ImageGenSyncClient(proxy.target, mint_token(DEV_JWT_SECRET, service_role=True)) as admin:
                return admin.grant_credits(user, 7, reason="sync, lost answer")

        granted = await asyncio.to_thread(grant)

    assert proxy.cut == 1
    assert await grants(db, user) == [(7, "sync, lost answer")]
    assert granted.balance == 7


async def test_a_replayed_grant_answers_the_first_result_and_a_reused_key_is_refused(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user, other = new_user(), new_user()
    async with (
        running_services(database_url, tmp_path, job={"new_user_credits": 0}) as services,
        services.service_client() as admin,
    ):
        first = await admin.grant_credits(user, 10, reason="order 1", request_id="order-1")
        second = await admin.grant_credits(user, 5, reason="order 2", request_id="order-2")
        replay = await admin.grant_credits(user, 10, reason="order 1", request_id="order-1")
        other_amount = await failure_of(admin.grant_credits(user, 11, reason="order 1", request_id="order-1"))
        other_user = await failure_of(admin.grant_credits(other, 10, reason="order 1", request_id="order-1"))
        other_premium = await failure_of(
            admin.grant_credits(user, 10, reason="order 1", premium=True, request_id="order-1")
        )
        bad_key = await failure_of(admin.grant_credits(user, 1, request_id="x" * 65))
        balance = await admin.credit_balance(user)

    assert (first.balance, second.balance) == (10, 15)
    assert replay.balance == 10, "a replay answers what the first grant answered"
    assert balance.balance == 15, "and grants nothing more"
    for refused in (other_amount, other_user, other_premium):
        assert (refused.code, refused.reason) == ("ALREADY_EXISTS", "REQUEST_ID_REUSED")
    assert (bad_key.code, list(bad_key.violations)) == ("INVALID_ARGUMENT", ["request_id"])
    assert await grants(db, user) == [(10, "order 1"), (5, "order 2")]
    assert await db.fetchval("SELECT count(*) FROM credit_accounts WHERE user_id = $1", other) == 0
    await assert_credits_consistent(db)


async def test_concurrent_grants_with_one_request_id_grant_once(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """Retries can overlap the call they retry (a deadline passed, the first is still running): the key is claimed
    first in the transaction, so the others wait for it and replay."""
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job={"new_user_credits": 0}) as services,
        services.service_client() as admin,
    ):
        answers = await asyncio.gather(
            *(admin.grant_credits(user, 3, reason="raced", request_id="race-1") for _ in range(20))
        )
    assert {a.balance for a in answers} == {3}
    assert await grants(db, user) == [(3, "raced")]
    await assert_credits_consistent(db)
