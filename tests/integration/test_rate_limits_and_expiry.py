"""CreateJob's rate limits, priorities and start deadlines through the public API, the client library and the CLI,
with JobService and GeneratorService running for real (and two JobService replicas sharing one database)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import grpc
from google.rpc import error_details_pb2, status_pb2
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from job_service import server as job_server
from tests.support.ledger import assert_credits_consistent
from tests.support.rpc_errors import RpcFailure, failure_of, read_failure
from tests.support.services import job_settings, new_user, running_services

CLI = str(Path(sys.executable).parent / "imagegen")
# Nothing runs: every job stays pending, so only the create path and the expiry sweep act.
IDLE = {"max_in_flight": 0, "active_jobs_per_user": 100, "expiry_sweep_seconds": 0.1}
LIMITED = {**IDLE, "create_rate_per_user": 3, "create_rate_window_seconds": 60}


async def refused(call: object) -> tuple[RpcFailure, float | None]:
    """What the caller sees of a refused call, and its RetryInfo's delay in seconds (None without one)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        retry = None
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        info = error_details_pb2.RetryInfo()
                        detail.Unpack(info)
                        retry = info.retry_delay.ToNanoseconds() / 1e9
        return read_failure(error), retry
    raise AssertionError("the call succeeded")


async def test_the_create_past_the_rate_limit_is_refused_with_retry_info_and_other_users_are_not(
    database_url: str, tmp_path: Path
) -> None:
    user, other = new_user(), new_user()
    async with (
        running_services(database_url, tmp_path, job=LIMITED) as services,
        services.client(user) as client,
        services.client(other) as other_client,
    ):
        first = await client.create_job("one", sample_count=1, request_id="rate-1")
        # A replay of a request_id answers the same job and counts nothing.
        for _ in range(3):
            assert (await client.create_job("one", sample_count=1, request_id="rate-1")).id == first.id
        await client.create_job("two", sample_count=1)
        await client.create_job("three", sample_count=1)

        failure, retry_after = await refused(client.create_job("four", sample_count=1))
        # ... even once the limit is reached: the replay is answered, not refused.
        assert (await client.create_job("one", sample_count=1, request_id="rate-1")).id == first.id
        assert (await other_client.create_job("someone else", sample_count=1)).state == pb.JOB_STATE_PENDING

    assert failure.code == "RESOURCE_EXHAUSTED" and failure.reason == "RATE_LIMITED"
    assert failure.metadata == {"limit": "3", "window_seconds": "60"}
    assert retry_after is not None and 55 < retry_after <= 60, "when the oldest of the three leaves the window"


async def test_two_replicas_count_one_users_creates_together(database_url: str, tmp_path: Path) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path, job=LIMITED) as services:
        second = await job_server.start(job_settings(database_url, f"127.0.0.1:{services.generator.port}", **LIMITED))
        try:
            token = mint_token(DEV_JWT_SECRET, user_id=user)
            async with (
                services.client(token=token) as on_first,
                ImageGenClient(f"127.0.0.1:{second.port}", token) as on_second,
            ):
                await on_first.create_job("a", sample_count=1)
                await on_second.create_job("b", sample_count=1)
                await on_first.create_job("c", sample_count=1)
                on_second_refused, _ = await refused(on_second.create_job("d", sample_count=1))
                on_first_refused, _ = await refused(on_first.create_job("e", sample_count=1))
        finally:
            await second.stop()

    assert on_second_refused.reason == on_first_refused.reason == "RATE_LIMITED"


async def test_priorities_are_bounded_by_role_and_default_by_account(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user, premium = new_user(), new_user()
    settings = {**IDLE, "premium_priority_default": 6, "premium_priority_max": 7}
    async with running_services(database_url, tmp_path, job=settings) as services:
        async with services.service_client() as admin:
            await admin.grant_credits(premium, 10, reason="premium", premium=True)
            for_user = await admin.create_job("for a user", sample_count=1, user_id=user, priority=9)
        async with services.client(user) as client, services.client(premium) as premium_client:
            default = await client.create_job("default", sample_count=1)
            asked = await client.create_job("asked", sample_count=1, priority=2)
            too_high = await failure_of(client.create_job("too high", sample_count=1, priority=6))
            out_of_range = await failure_of(client.create_job("no such", sample_count=1, priority=10))
            premium_default = await premium_client.create_job("premium", sample_count=1)
            premium_high = await premium_client.create_job("premium", sample_count=1, priority=7)
            premium_too_high = await failure_of(premium_client.create_job("premium", sample_count=1, priority=8))

    assert (default.priority, asked.priority, for_user.priority) == (5, 2, 9)
    assert (premium_default.priority, premium_high.priority) == (6, 7)
    assert too_high.code == "INVALID_ARGUMENT" and too_high.violations == {"priority": "must be 0-5 for this account"}
    assert premium_too_high.violations == {"priority": "must be 0-7 for this account"}
    assert out_of_range.violations == {"priority": "must be 0-9"}
    stored = await db.fetchval("SELECT priority FROM generation_jobs WHERE id = $1", asked.id)
    assert stored == 2
    assert await db.fetchval("SELECT count(*) FROM generation_jobs WHERE user_id = $1", user) == 3


async def test_a_job_not_started_within_start_within_ends_expired_for_its_watcher_and_its_credits_come_back(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path, job=IDLE) as services, services.client(user) as client:
        job = await client.create_job("no worker is free", sample_count=2, start_within=1.0)
        reserved = await client.credit_balance()
        updates = [update async for update in client.watch(job.id)]
        listed = await client.list_jobs(state=pb.JOB_STATE_EXPIRED)
        balance = await client.credit_balance()
        bad = await failure_of(client.create_job("too soon", sample_count=1, start_within=0.5))
        late = await failure_of(client.create_job("too late", sample_count=1, start_within=8 * 86_400))

    assert job.HasField("start_deadline") and job.start_deadline.ToDatetime() > job.create_time.ToDatetime()
    assert reserved.balance == 98 and reserved.reserved == 2
    last = updates[-1]
    assert last.job.state == pb.JOB_STATE_EXPIRED and last.event.type == pb.JOB_EVENT_TYPE_EXPIRED
    assert last.job.error.reason == "START_DEADLINE_EXCEEDED"
    assert (last.job.credits_reserved, last.job.credits_charged, last.job.attempt) == (0, 0, 0)
    assert [j.id for j in listed.jobs] == [job.id]
    assert (balance.balance, balance.reserved) == (100, 0)
    assert bad.violations == late.violations == {"start_within": "must be between 1 second and 7 days"}
    await assert_credits_consistent(db)


async def cli(target: str, token: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "IMAGEGEN_TARGET": target, "IMAGEGEN_TOKEN": token}
    env.pop("COLUMNS", None)
    process = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_sends_priority_and_start_within_and_shows_expired(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    token = mint_token(DEV_JWT_SECRET, user_id=user)
    async with running_services(database_url, tmp_path, job=IDLE) as services:
        code, _, err = await cli(
            services.target, token, "generate", "expires", "-n", "1", "--priority", "3", "--start-within", "1s"
        )
        assert code == 1 and "job EXPIRED" in err and "START_DEADLINE_EXCEEDED" in err, err
        row = await db.fetchrow(
            """SELECT id, priority, status, start_deadline - created_at AS within
               FROM generation_jobs WHERE user_id = $1""",
            user,
        )
        assert (row["priority"], row["status"], row["within"].total_seconds()) == (3, "expired", 1.0)

        code, listed, err = await cli(services.target, token, "jobs", "list", "--state", "expired")
        assert code == 0 and str(row["id"]) in listed and "EXPIRED" in listed, err

        code, _, err = await cli(services.target, token, "generate", "x", "--start-within", "soon")
        assert code != 0 and "not a duration" in err
