"""Graceful drain on SIGTERM: JobService finishes or hands back its jobs, GeneratorService finishes its streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as gen_pb
from imagegen.generator.v1 import generator_service_pb2_grpc as gen_grpc

from tests.support.cluster import events_of, eventually, fresh_database, jobs_by_id, owner_pid, wait_terminal
from tests.support.ledger import assert_credits_consistent
from tests.support.processes import generator_process, job_process
from tests.support.replicas import (
    SERVING,
    close_clients,
    health,
    pause,
    pid,
    resume,
    service_client,
    sigterm,
    start,
    stop,
    wait_exit,
)


@pytest.fixture
async def drain_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


async def streams_open(conn: asyncpg.Connection, ids: list[str], owner: int | None = None) -> bool:
    """True once every job is generating (on `owner`, if given) and its provider call has started."""
    rows = await jobs_by_id(conn, ids)
    started = await conn.fetch(
        "SELECT DISTINCT job_id FROM job_events WHERE job_id = ANY($1::uuid[]) AND type = 'generation_started'",
        ids,
    )
    return (
        len(rows) == len(ids)
        and all(r["status"] == "generating" for r in rows.values())
        and (owner is None or all(owner_pid(r["lease_owner"]) == owner for r in rows.values()))
        and len(started) == len(ids)
    )


def worker_pids(events: list[dict[str, object]]) -> list[int | None]:
    """The pid of the worker of each attempt, in order."""
    return [owner_pid(str(e["detail"].get("worker"))) for e in events if e["type"] == "attempt_started"]  # type: ignore[attr-defined]


async def test_sigterm_with_ten_jobs_in_flight_hands_them_back_and_the_other_replica_finishes_them(
    drain_db: str, tmp_path: Path
) -> None:
    generator = generator_process(
        tmp_path, GEN_LOCAL_LATENCY_MIN_SECONDS="3", GEN_LOCAL_LATENCY_MAX_SECONDS="4", GEN_SHUTDOWN_GRACE_SECONDS="10"
    )
    settings = {"JOB_SHUTDOWN_GRACE_SECONDS": "1", "JOB_ACTIVE_JOBS_PER_USER": "100"}
    draining = job_process(tmp_path, drain_db, generator.target, "job-a", **settings)
    other = job_process(tmp_path, drain_db, generator.target, "job-b", **settings)
    everything = [generator, draining, other]
    conn = await asyncpg.connect(drain_db)
    client = service_client(draining)
    try:
        await start(*everything)
        user = str(uuid.uuid4())
        pause(other)  # so that the draining replica is the one running all ten
        try:
            ids = [
                (await client.create_job(f"drain {i}", user_id=user, sample_count=1, request_id=f"drain-{i}")).id
                for i in range(10)
            ]
            assert await eventually(lambda: streams_open(conn, ids, pid(draining)), bool, within=30)
        finally:
            resume(other)

        sigterm(draining)
        assert await eventually(lambda: health(draining), lambda s: s != SERVING, within=10) != SERVING
        assert await wait_exit(draining, 60) == 0, draining.log_tail()
        rows = await wait_terminal(conn, ids, within=60)

        handed_back = 0
        for job_id in ids:
            row = rows[job_id]
            events = await events_of(conn, job_id)
            assert row["status"] == "completed", (row["status"], [e["type"] for e in events])
            assert row["credits_charged"] == 1 and row["failed_attempts"] == 0
            assert "lease_expired" not in [e["type"] for e in events], "resumed at once, not after the lease"
            backs = [e for e in events if e["type"] == "handed_back"]
            if not backs:  # finished on the draining replica within its grace
                assert worker_pids(events) == [pid(draining)]
                continue
            handed_back += 1
            [back] = backs
            assert back["status"] == "pending" and back["attempt"] == 1
            assert "shutdown" in back["detail"]["message"]
            assert worker_pids(events) == [pid(draining), pid(other)], "the other replica resumed it"
        assert handed_back >= 1
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM generation_jobs WHERE id = ANY($1::uuid[]) AND lease_owner IS NOT NULL", ids
            )
            == 0
        )
        await assert_credits_consistent(conn)
        print(f"\ndrain: {handed_back} of 10 handed back, {10 - handed_back} finished within the grace")
    finally:
        await close_clients([client])
        await conn.close()
        await stop(everything)


async def test_sigterm_lets_in_flight_jobs_finish_within_the_grace_and_claims_nothing_new(
    drain_db: str, tmp_path: Path
) -> None:
    generator = generator_process(
        tmp_path, GEN_LOCAL_LATENCY_MIN_SECONDS="2", GEN_LOCAL_LATENCY_MAX_SECONDS="3", GEN_SHUTDOWN_GRACE_SECONDS="10"
    )
    settings = {"JOB_SHUTDOWN_GRACE_SECONDS": "30", "JOB_ACTIVE_JOBS_PER_USER": "100"}
    draining = job_process(tmp_path, drain_db, generator.target, "job-a", **settings)
    other = job_process(tmp_path, drain_db, generator.target, "job-b", **settings)
    everything = [generator, draining, other]
    conn = await asyncpg.connect(drain_db)
    clients = [service_client(draining), service_client(other)]
    try:
        await start(*everything)
        user = str(uuid.uuid4())
        pause(other)
        try:
            ids = [
                (await clients[0].create_job(f"finish {i}", user_id=user, sample_count=1, request_id=f"f-{i}")).id
                for i in range(4)
            ]
            assert await eventually(lambda: streams_open(conn, ids, pid(draining)), bool, within=30)
        finally:
            resume(other)

        sigterm(draining)
        assert await eventually(lambda: health(draining), lambda s: s != SERVING, within=10) != SERVING
        await asyncio.sleep(0.3)
        late = await clients[1].create_job("created during the drain", user_id=user, sample_count=1)
        assert await wait_exit(draining, 60) == 0, draining.log_tail()
        rows = await wait_terminal(conn, [*ids, late.id], within=60)

        for job_id in ids:
            events = await events_of(conn, job_id)
            assert rows[job_id]["status"] == "completed" and rows[job_id]["attempt"] == 1
            assert worker_pids(events) == [pid(draining)], "finished where it ran"
            assert "handed_back" not in [e["type"] for e in events]
        assert rows[late.id]["status"] == "completed"
        assert worker_pids(await events_of(conn, late.id)) == [pid(other)], "a draining replica claims nothing"
        await assert_credits_consistent(conn)
    finally:
        await close_clients(clients)
        await conn.close()
        await stop(everything)


async def test_generator_sigterm_finishes_streams_in_flight_and_refuses_new_ones(drain_db: str, tmp_path: Path) -> None:
    latency = {"GEN_LOCAL_LATENCY_MIN_SECONDS": "2", "GEN_LOCAL_LATENCY_MAX_SECONDS": "3"}
    leaving = generator_process(tmp_path, "generator-a", GEN_SHUTDOWN_GRACE_SECONDS="20", **latency)
    staying = generator_process(tmp_path, "generator-b", GEN_SHUTDOWN_GRACE_SECONDS="20", **latency)
    jobs = job_process(tmp_path, drain_db, f"ipv4:{leaving.target},{staying.target}", JOB_ACTIVE_JOBS_PER_USER="100")
    everything = [leaving, staying, jobs]
    conn = await asyncpg.connect(drain_db)
    client = service_client(jobs)
    try:
        await start(*everything)
        user = str(uuid.uuid4())
        ids = [
            (await client.create_job(f"stream {i}", user_id=user, sample_count=1, request_id=f"s-{i}")).id
            for i in range(6)
        ]
        assert await eventually(lambda: streams_open(conn, ids), bool, within=30)

        sigterm(leaving)
        assert await eventually(lambda: health(leaving), lambda s: s != SERVING, within=10) != SERVING
        async with grpc.aio.insecure_channel(leaving.target) as channel:
            request = gen_pb.GenerateRequest(
                job_id=str(uuid.uuid4()), attempt=1, user_id=user, prompt="too late", model="local", sample_count=1
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in gen_grpc.GeneratorServiceStub(channel).Generate(request, timeout=10):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await wait_exit(leaving, 60) == 0, leaving.log_tail()

        rows = await wait_terminal(conn, ids, within=60)
        assert all(r["status"] == "completed" and r["attempt"] == 1 for r in rows.values()), {
            i: (r["status"], r["attempt"]) for i, r in rows.items()
        }
        leaving_storage = f":{leaving.env['GEN_STORAGE_HTTP_PORT']}/"
        served_by_leaving = [i for i, r in rows.items() if any(leaving_storage in u for u in r["result_urls"])]
        assert served_by_leaving, "some streams in flight on the stopping generator finished there"

        more = [(await client.create_job(f"after {i}", user_id=user, sample_count=1)).id for i in range(3)]
        after = await wait_terminal(conn, more, within=60)
        assert all(r["status"] == "completed" for r in after.values())
        await assert_credits_consistent(conn)
        print(f"\ngenerator drain: {len(served_by_leaving)} of 6 streams finished on the stopping generator")
    finally:
        await close_clients([client])
        await conn.close()
        await stop(everything)
