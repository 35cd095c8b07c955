"""Webhooks survive the death of the replica sending them: kill -9 mid-send, every event still arrives, in order.

Two JobService processes share one database. The receiver holds the first webhook it gets without answering;
the replica that holds its lease (read from the outbox) is killed with SIGKILL while the request is open. The
receiver then answers normally: the lease runs out, the surviving replica sends that delivery again (at least
once: same webhook-id) and then every later one, in event order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.generator.fake_http import Exchange, Reply
from tests.support.cluster import fresh_database, owner_pid, wait_terminal
from tests.support.processes import generator_process, job_process
from tests.support.replicas import close_clients, kill, pid, service_client, start, stop
from tests.support.webhooks import Receiver, eventually, new_secret, spec_signature_valid

SECRET = new_secret()


@pytest.fixture
async def webhook_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


async def test_kill_minus_nine_of_the_sending_replica_loses_no_delivery(webhook_db: str, tmp_path: Path) -> None:
    release = asyncio.Event()
    held: list[str] = []

    async def hold_the_first(exchange: Exchange) -> Reply:
        if not held:
            held.append(exchange.request.headers["webhook-id"])
            await release.wait()  # never answered: its sender dies first
        return Reply(200)

    receiver = await Receiver(hold_the_first).start()
    generator = generator_process(tmp_path, GEN_LOCAL_LATENCY_MIN_SECONDS="0.5", GEN_LOCAL_LATENCY_MAX_SECONDS="0.5")
    replicas = [
        job_process(
            tmp_path,
            webhook_db,
            generator.target,
            f"job-{i}",
            JOB_LEASE_SECONDS="3",
            JOB_WEBHOOK_SECRETS=json.dumps([SECRET]),
            JOB_WEBHOOK_ALLOW_HTTP="true",
            JOB_WEBHOOK_ALLOW_PRIVATE="true",
            JOB_WEBHOOK_TIMEOUT_SECONDS="3",  # a lease of 11 s on each send
            JOB_WEBHOOK_RETRY_BASE_SECONDS="0.2",
            JOB_WEBHOOK_RETRY_MAX_SECONDS="1",
        )
        for i in range(2)
    ]
    conn = await asyncpg.connect(webhook_db)
    clients = [service_client(r, attempts=5) for r in replicas]
    try:
        await start(generator, *replicas)
        job = await clients[0].create_job(
            "a lighthouse",
            user_id=str(uuid.uuid4()),
            sample_count=2,
            webhook_url=receiver.url,
            webhook_events=["started", "image_stored", "completed"],
        )
        await asyncio.wait_for(receiver.arrived.wait(), timeout=20)
        sender = await conn.fetchval(
            "SELECT lease_owner FROM webhook_deliveries WHERE job_id = $1 AND lease_owner IS NOT NULL", job.id
        )
        victim = next(r for r in replicas if pid(r) == owner_pid(sender))
        await kill(victim)
        release.set()

        await wait_terminal(conn, [job.id], within=60)

        async def all_delivered() -> bool:
            states = await conn.fetch("SELECT state FROM webhook_deliveries WHERE job_id = $1", job.id)
            return bool(states) and all(s["state"] == "delivered" for s in states)

        await eventually(all_delivered, 60, "every delivery delivered by the surviving replica")
        rows = await conn.fetch(
            "SELECT id, type, attempts, lease_owner FROM webhook_deliveries WHERE job_id = $1 ORDER BY seq", job.id
        )
    finally:
        release.set()
        await close_clients(clients)
        await stop([generator, *replicas])
        await conn.close()
        await receiver.stop()

    expected_ids = ["msg_" + str(r["id"]).replace("-", "") for r in rows]
    firsts = receiver.first_of_each()
    assert [r.headers["webhook-id"] for r in firsts] == expected_ids, "every event, in event order"
    types = [json.loads(r.body)["type"] for r in firsts]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert types.count("job.image_stored") == 2
    sent_again = [r for r in receiver.requests if r.headers["webhook-id"] == held[0]]
    assert len(sent_again) >= 2, "the send cut by the kill was made again"
    assert rows[0]["attempts"] >= 2
    assert all(spec_signature_valid(SECRET, r) for r in receiver.requests)
