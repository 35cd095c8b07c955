"""Across replicas: a cancel sent to one JobService stops the provider call of a job another one runs, and
WatchJob on either replica follows every job, whichever replica runs it."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.generator.fake_google import FakeGeminiImagen, hang
from tests.support.cluster import events_of, eventually, fresh_database, jobs_by_id, owner_pid, wait_terminal
from tests.support.ledger import assert_credits_consistent
from tests.support.processes import ServiceProcess, generator_process, job_process
from tests.support.replicas import close_clients, pid, service_client, start, stop

FAST_IMAGEN = "gemini-api/imagen-4.0-fast-generate-001"
TERMINAL_STATES = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_EXPIRED)
STATE_NAMES = {
    "pending": pb.JOB_STATE_PENDING,
    "generating": pb.JOB_STATE_GENERATING,
    "completed": pb.JOB_STATE_COMPLETED,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}


@pytest.fixture
async def own_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


async def test_cancel_through_the_other_replica_stops_the_provider_request_and_releases_the_credits(
    own_db: str, tmp_path: Path
) -> None:
    api = FakeGeminiImagen()
    await api.start()
    api.faults.append(hang(120))  # the provider call never answers: only a cancel ends it
    generator = generator_process(
        tmp_path, GEN_GEMINI_API_KEY="test-api-key", GEN_GEMINI_BASE_URL=api.url, GEN_PROVIDER_MAX_RETRIES="0"
    )
    replicas = [job_process(tmp_path, own_db, generator.target, f"job-{i}") for i in range(2)]
    everything = [generator, *replicas]
    user = str(uuid.uuid4())
    token = mint_token(DEV_JWT_SECRET, user_id=user)
    clients = {r.target: ImageGenClient(r.target, token) for r in replicas}
    conn = await asyncpg.connect(own_db)
    try:
        await start(*everything)
        job = await clients[replicas[0].target].create_job("a lighthouse at dusk", model=FAST_IMAGEN, sample_count=2)
        assert job.credits_reserved == 2
        assert await eventually(lambda: asyncio.sleep(0, len(api.requests)), lambda n: n == 1, within=30) == 1
        row = (await jobs_by_id(conn, [job.id]))[job.id]
        assert row["status"] == "generating"
        owner = next(r for r in replicas if pid(r) == owner_pid(row["lease_owner"]))
        other = next(r for r in replicas if r is not owner)

        answer = await clients[other.target].cancel_job(job.id)
        assert answer.cancel_requested or answer.state == pb.JOB_STATE_CANCELLED
        done = await clients[other.target].wait(job.id, timeout=30)

        assert done.state == pb.JOB_STATE_CANCELLED
        assert (done.credits_reserved, done.credits_charged, len(done.images)) == (0, 0, 0)
        # The generator cancelled the provider request in flight: the fake saw its client hang up.
        assert await eventually(lambda: asyncio.sleep(0, api.http.disconnects), lambda n: n == 1, within=15) == 1
        assert len(api.requests) == 1, "cancelled, not retried"
        events = await events_of(conn, job.id)
        assert [e["type"] for e in events][-2:] == ["cancel_requested", "cancelled"]
        assert events[-1]["attempt"] == 1 and "retry_scheduled" not in [e["type"] for e in events]
        assert await conn.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user) == 100
        kinds = await conn.fetch("SELECT kind, amount FROM credit_ledger WHERE job_id = $1 ORDER BY kind", job.id)
        assert [(r["kind"], r["amount"]) for r in kinds] == [("capture", 0), ("release", 2), ("reserve", -2)]
        await assert_credits_consistent(conn)

        # The owner, not the replica that took the call, ended the attempt (its one line per transition).
        def cancelled_here(process: ServiceProcess) -> list[object]:
            return [
                e["attempt"]
                for e in process.log_entries()
                if e["event"] == "job transition" and e["job_event"] == "cancelled" and e["job_id"] == job.id
            ]

        assert cancelled_here(owner) == [1] and cancelled_here(other) == []
    finally:
        await close_clients(clients.values())
        await conn.close()
        await stop(everything)
        await api.stop()


async def watch(stub: pb_grpc.JobServiceStub, job_id: str, token: str, delay: float) -> list[pb.WatchJobResponse]:
    await asyncio.sleep(delay)
    stream = stub.WatchJob(
        pb.WatchJobRequest(job_id=job_id), metadata=(("authorization", f"Bearer {token}"),), timeout=120
    )
    return [update async for update in stream]


async def test_two_hundred_watchers_on_two_replicas_each_see_every_change_of_their_job_in_order(
    own_db: str, tmp_path: Path
) -> None:
    generator = generator_process(tmp_path, GEN_LOCAL_LATENCY_MIN_SECONDS="0.5", GEN_LOCAL_LATENCY_MAX_SECONDS="2.0")
    replicas = [
        job_process(tmp_path, own_db, generator.target, f"job-{i}", JOB_ACTIVE_JOBS_PER_USER="100") for i in range(2)
    ]
    everything: list[ServiceProcess] = [generator, *replicas]
    users = [str(uuid.uuid4()) for _ in range(10)]
    tokens = {u: mint_token(DEV_JWT_SECRET, user_id=u) for u in users}
    creators = [service_client(r, attempts=3) for r in replicas]
    # A few connections per replica, so the streams do not all share one HTTP/2 connection.
    channels = {r.target: [grpc.aio.insecure_channel(r.target) for _ in range(4)] for r in replicas}
    conn = await asyncpg.connect(own_db)
    try:
        await start(*everything)

        async def create(index: int) -> tuple[str, str]:
            user = users[index % len(users)]
            job = await creators[index % 2].create_job(f"watched {index}", user_id=user, sample_count=2)
            return job.id, user

        created = await asyncio.gather(*(create(i) for i in range(100)))
        # Each job gets one watcher on each replica, opened at staggered moments: before, during and
        # after its attempt starts, so snapshots fall on every side of the first live event.
        watched: list[tuple[str, str, ServiceProcess]] = []
        tasks = []
        for n, (job_id, user) in enumerate(created):
            for replica in replicas:
                stub = pb_grpc.JobServiceStub(channels[replica.target][n % 4])
                tasks.append(watch(stub, job_id, tokens[user], random.uniform(0.0, 1.5)))
                watched.append((job_id, user, replica))
        streams = await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)
        assert len(streams) == 200

        rows = await wait_terminal(conn, [j for j, _ in created], within=60)
        histories = {job_id: await events_of(conn, job_id) for job_id, _ in created}
        cross_replica = 0
        live_events = 0
        for (job_id, _user, replica), updates in zip(watched, streams, strict=True):
            snapshot, live = updates[0], updates[1:]
            assert not snapshot.HasField("event") and all(u.HasField("event") for u in live)
            history = histories[job_id]
            if snapshot.job.state in TERMINAL_STATES:
                assert not live and snapshot.job.state == pb.JOB_STATE_COMPLETED
                continue
            seqs = [u.event.seq for u in live]
            assert seqs == list(range(seqs[0], history[-1]["seq"] + 1)), (job_id, seqs, len(history))
            # Nothing missed between the snapshot and the first live event: the snapshot is the job as it
            # was right after event seqs[0] - 1.
            before = history[seqs[0] - 2]
            assert STATE_NAMES[before["status"]] == snapshot.job.state, (job_id, before, snapshot.job.state)
            assert before["attempt"] == snapshot.job.attempt
            for update, stored in zip(live, history[seqs[0] - 1 :], strict=True):
                assert (update.event.seq, update.event.state) == (stored["seq"], STATE_NAMES[stored["status"]])
            assert live[-1].event.state == pb.JOB_STATE_COMPLETED
            live_events += len(live)
            runner = owner_pid(next(e for e in reversed(history) if e["type"] == "attempt_started")["detail"]["worker"])
            cross_replica += runner != pid(replica)
        assert all(r["status"] == "completed" for r in rows.values())
        assert cross_replica >= 20, f"watchers following a job another replica ran: {cross_replica}"
        await assert_credits_consistent(conn)
        print(f"\nwatch: 200 streams, {live_events} live events, {cross_replica} on a replica not running the job")
    finally:
        for replica_channels in channels.values():
            for channel in replica_channels:
                await channel.close()
        await close_clients(creators)
        await conn.close()
        await stop(everything)
