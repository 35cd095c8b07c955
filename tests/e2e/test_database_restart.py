"""PostgreSQL restarted under running services: they ride it out without a restart of their own.

The database is a server of this test's own (the session's shared one must not be restarted under
other tests). While jobs run and WatchJob streams are open, PostgreSQL is stopped (fast shutdown: every
session is terminated, as in a restart or failover) and started again. JobService reports NOT_SERVING
while its database is away and SERVING after; its pool, LISTEN connection and dispatcher reconnect with
backoff; the jobs in flight, the watchers and new jobs all complete.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from imagegen_common.migrate import migrate
from tests.support.cluster import check_event_history, events_of, eventually, wait_terminal
from tests.support.ledger import assert_credits_consistent
from tests.support.processes import ServiceProcess, generator_process, job_process
from tests.support.replicas import SERVING, close_clients, create_on_any, health, pid, service_client, start, stop
from tests.support.restartable_postgres import RestartablePostgres

NOT_SERVING = 2


@pytest.fixture
def postgres() -> Iterator[RestartablePostgres]:
    server = RestartablePostgres()
    try:
        yield server
    finally:
        server.close()


async def watch_all(target: str, job_id: str, user_id: str, opened: asyncio.Event) -> list[pb.WatchJobResponse]:
    """One WatchJob stream, never reopened: it has to survive the restart by itself."""
    async with grpc.aio.insecure_channel(target) as channel:
        stream = pb_grpc.JobServiceStub(channel).WatchJob(
            pb.WatchJobRequest(job_id=job_id),
            metadata=(("authorization", f"Bearer {mint_token(DEV_JWT_SECRET, user_id=user_id)}"),),
            timeout=150,
        )
        updates = []
        async for update in stream:
            updates.append(update)
            opened.set()  # the snapshot is in: from here on the stream lives on the LISTEN fan-out
        return updates


def warning_lines(process: ServiceProcess) -> int:
    return sum(1 for line in process.log_path.read_text(errors="replace").splitlines() if '"level": "warning"' in line)


async def test_postgres_restart_mid_run_leaves_services_running_and_every_job_completes(
    postgres: RestartablePostgres, tmp_path: Path
) -> None:
    url = postgres.url()
    await migrate(url)
    generator = generator_process(tmp_path, GEN_LOCAL_LATENCY_MIN_SECONDS="0.5", GEN_LOCAL_LATENCY_MAX_SECONDS="1.5")
    settings = {
        "JOB_LEASE_SECONDS": "5",
        "JOB_RETRY_BASE_SECONDS": "0.2",
        "JOB_RETRY_MAX_SECONDS": "1",
        "JOB_ACTIVE_JOBS_PER_USER": "100",
    }
    replicas = [job_process(tmp_path, url, generator.target, f"job-{i}", **settings) for i in range(2)]
    everything = [generator, *replicas]
    clients = [(r, service_client(r)) for r in replicas]
    user = str(uuid.uuid4())
    watchers: list[asyncio.Task[list[pb.WatchJobResponse]]] = []
    try:
        await start(*everything)
        pids = [pid(r) for r in replicas]

        async def create(tag: str, n: int) -> list[str]:
            return [
                (
                    await create_on_any(
                        clients, user_id=user, request_id=f"{tag}-{i}", prompt=f"{tag} {i}", sample_count=1 + i % 2
                    )
                ).id
                for i in range(n)
            ]

        before = await create("before", 16)
        opened = [asyncio.Event() for _ in range(6)]
        watchers = [
            asyncio.create_task(watch_all(replicas[i % 2].target, job_id, user, opened[i]))
            for i, job_id in enumerate(before[:6])
        ]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), timeout=30)
        conn = await asyncpg.connect(url)
        try:
            await eventually(
                lambda: conn.fetchval("SELECT count(*) FROM generation_jobs WHERE status = 'generating'"),
                lambda n: n >= 2,
                within=30,
                every=0.05,
            )
        finally:
            await conn.close()

        await asyncio.to_thread(postgres.stop, "fast")
        for replica in replicas:
            assert await eventually(lambda r=replica: health(r), lambda s: s == NOT_SERVING, within=20) == NOT_SERVING
        warnings_at_stop = [warning_lines(r) for r in replicas]
        await asyncio.sleep(3)  # down for a while: every loop meets the outage, and must not spin
        warnings_in_outage = [warning_lines(r) - w for r, w in zip(replicas, warnings_at_stop, strict=True)]
        await asyncio.to_thread(postgres.start)

        for replica in replicas:
            assert await eventually(lambda r=replica: health(r), lambda s: s == SERVING, within=30) == SERVING
        assert [pid(r) for r in replicas] == pids, "no JobService restarted"
        assert all(p.alive() for p in everything), {
            p.log_path.stem: (p.process.returncode if p.process else None, p.log_tail(5)) for p in everything
        }

        after = await create("after", 8)
        conn = await asyncpg.connect(url)
        try:
            rows = await wait_terminal(conn, before + after, within=90)
            assert {i: r["status"] for i, r in rows.items() if r["status"] != "completed"} == {}
            for job_id, row in rows.items():
                assert not check_event_history(row, await events_of(conn, job_id)), job_id
            await assert_credits_consistent(conn)
            updates = await asyncio.wait_for(asyncio.gather(*watchers), timeout=60)
            for job_id, stream in zip(before, updates, strict=False):
                seqs = [u.event.seq for u in stream[1:]]
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (job_id, seqs)
                assert stream[-1].event.state == pb.JOB_STATE_COMPLETED
                assert seqs[-1] == rows[job_id]["last_event_seq"]
        finally:
            await conn.close()
        # Backoff, not a busy loop: a few lines per loop while the database was away, not thousands.
        assert all(n < 200 for n in warnings_in_outage), warnings_in_outage
        print(f"\ndatabase restart: warnings logged per replica during ~3 s of outage: {warnings_in_outage}")
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await close_clients(c for _, c in clients)
        await stop(everything)


async def test_a_job_service_started_before_its_database_waits_for_it_instead_of_crash_looping(
    postgres: RestartablePostgres, tmp_path: Path
) -> None:
    url = postgres.url()
    await migrate(url)
    await asyncio.to_thread(postgres.stop, "fast")
    generator = generator_process(tmp_path)
    replica = job_process(tmp_path, url, generator.target, JOB_MIGRATE_ON_START="true")
    client = service_client(replica, attempts=3)
    coming_up: asyncio.Task[None] | None = None

    def log_text() -> str:
        return replica.log_path.read_text() if replica.log_path.exists() else ""

    try:
        await start(generator)
        coming_up = asyncio.create_task(start(replica))
        waiting = await eventually(
            lambda: asyncio.to_thread(log_text),
            lambda log: log.count("database unreachable at start") >= 2,
            within=30,
        )
        assert "database unreachable at start" in waiting and replica.alive(), replica.log_tail()
        first_pid = pid(replica)
        await asyncio.to_thread(postgres.start)
        await asyncio.wait_for(coming_up, timeout=60)
        assert pid(replica) == first_pid and await health(replica) == SERVING
        job = await client.create_job("after the database came up", user_id=str(uuid.uuid4()), sample_count=1)
        async with ImageGenClient(replica.target, mint_token(DEV_JWT_SECRET, user_id=job.user_id)) as owner:
            done = await owner.wait(job.id, timeout=60)
        assert done.state == pb.JOB_STATE_COMPLETED
    finally:
        if coming_up is not None and not coming_up.done() and replica.process is not None:
            replica.kill()  # ends the start() still waiting for it
        if coming_up is not None:
            await asyncio.gather(coming_up, return_exceptions=True)
        await close_clients([client])
        await stop([generator, replica])
