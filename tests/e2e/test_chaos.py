"""Chaos: replicas of both services killed with SIGKILL at random moments; every job still ends once, charged once.

Two JobService and two GeneratorService processes share one database; JobService reaches both generators
through one round_robin channel. While jobs stream in, a random replica of each kind is killed (kill -9,
while it has work in flight) and restarted. Leases are 3 s, so a dead JobService's jobs are reaped and
run again quickly; a dead generator's streams fail UNAVAILABLE and are retried on the other one.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.cluster import check_event_history, events_of, fresh_database, owner_pid, wait_terminal
from tests.support.ledger import assert_credits_consistent
from tests.support.processes import ServiceProcess, generator_process, job_process
from tests.support.replicas import close_clients, create_on_any, kill, pid, service_client, start, stop

MIN_JOBS = 60
MAX_JOBS = 160
USERS = 12


@pytest.fixture
async def chaos_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


async def test_kill_minus_nine_replicas_of_both_services_and_every_job_still_completes_once(
    chaos_db: str, tmp_path: Path
) -> None:
    began = time.monotonic()
    rng = random.Random()
    generators = [
        generator_process(
            tmp_path,
            f"generator-{i}",
            GEN_LOCAL_LATENCY_MIN_SECONDS="0.5",
            GEN_LOCAL_LATENCY_MAX_SECONDS="2.0",
            GEN_SHUTDOWN_GRACE_SECONDS="1",
        )
        for i in range(2)
    ]
    generator_target = "ipv4:" + ",".join(g.target for g in generators)
    replicas = [
        job_process(
            tmp_path,
            chaos_db,
            generator_target,
            f"job-{i}",
            JOB_LEASE_SECONDS="3",
            JOB_MAX_IN_FLIGHT="4",
            JOB_RETRY_BASE_SECONDS="0.2",
            JOB_RETRY_MAX_SECONDS="1.0",
            JOB_ACTIVE_JOBS_PER_USER="100",
            JOB_SHUTDOWN_GRACE_SECONDS="2",
        )
        for i in range(2)
    ]
    everything = [*generators, *replicas]
    conn = await asyncpg.connect(chaos_db)
    clients = [(r, service_client(r)) for r in replicas]
    job_ids: list[str] = []
    sample_counts: dict[str, int] = {}
    kills: list[dict[str, object]] = []
    try:
        await start(*everything)
        users = [str(uuid.uuid4()) for _ in range(USERS)]
        chaos_over = asyncio.Event()

        async def submit() -> None:
            index = 0
            while index < MAX_JOBS and (index < MIN_JOBS or not chaos_over.is_set()):
                samples = 1 + index % 2
                job = await create_on_any(
                    clients,
                    user_id=users[index % USERS],
                    request_id=f"chaos-{index}",
                    prompt=f"chaos job {index}",
                    sample_count=samples,
                )
                if job.id not in sample_counts:
                    job_ids.append(job.id)
                    sample_counts[job.id] = samples
                index += 1
                await asyncio.sleep(0.2)

        async def in_flight_by_pid() -> Counter[int | None]:
            rows = await conn.fetch("SELECT lease_owner FROM generation_jobs WHERE status = 'generating'")
            return Counter(owner_pid(r["lease_owner"]) for r in rows)

        async def chaos() -> None:
            plan = ["job", "generator", "job", "generator"]
            rng.shuffle(plan)
            for kind in plan:
                await asyncio.sleep(rng.uniform(0.5, 2.5))
                for _ in range(100):  # kill while there is work in flight (up to ~10 s of waiting)
                    if sum((await in_flight_by_pid()).values()) >= 2:
                        break
                    await asyncio.sleep(0.1)
                held = await in_flight_by_pid()
                if kind == "job":
                    busy = [r for r in replicas if held.get(pid(r))]
                    victim: ServiceProcess = rng.choice(busy or replicas)
                    jobs_held = held.get(pid(victim), 0)
                else:
                    victim = rng.choice(generators)
                    jobs_held = sum(held.values())  # streams of both generators; round_robin splits them
                await kill(victim)
                kills.append({"kind": kind, "victim": victim.log_path.stem, "in_flight": jobs_held})
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                await start(victim)
            chaos_over.set()

        await asyncio.gather(submit(), chaos())
        rows = await wait_terminal(conn, job_ids, within=150)

        not_done = {i: r["status"] for i, r in rows.items() if r["status"] != "completed"}
        assert not not_done, f"jobs that did not complete: {not_done}\n" + "\n".join(p.log_tail(15) for p in everything)
        assert len(job_ids) >= MIN_JOBS and len(kills) >= 3
        assert all(p.alive() for p in everything), "restarted replicas are running"

        # Charged exactly once each, for the images delivered: sample_count of them in all, whichever attempts
        # stored them (a retry asks only for the images still owed), each once.
        for job_id, row in rows.items():
            expected = sample_counts[job_id]
            assert (row["credits_charged"], row["credits_reserved"], len(row["result_paths"])) == (
                expected,
                0,
                expected,
            )
            assert len(set(row["result_paths"])) == expected
            assert all(1 <= int(path.split("/")[-1].split("-")[0]) <= row["attempt"] for path in row["result_paths"])
            assert all((tmp_path / "storage" / "images" / path).is_file() for path in row["result_paths"])
        await assert_credits_consistent(conn)
        balances = {
            str(r["user_id"]): r["balance"] for r in await conn.fetch("SELECT user_id, balance FROM credit_accounts")
        }
        for user in users:
            spent = sum(rows[j]["credits_charged"] for j in job_ids if str(rows[j]["user_id"]) == user)
            assert balances[user] == 100 - spent

        # Every attempt left its trail, and each ended in exactly one way.
        histories = {job_id: await events_of(conn, job_id) for job_id in job_ids}
        problems = {j: p for j in job_ids if (p := check_event_history(rows[j], histories[j]))}
        assert not problems, problems

        all_events = [e for h in histories.values() for e in h]
        endings = Counter(e["type"] for e in all_events if e["type"] in ("lease_expired", "retry_scheduled"))
        retry_reasons = Counter(e["detail"].get("error_code") for e in all_events if e["type"] == "retry_scheduled")
        # The kills landed on work in flight: a dead JobService's jobs came back through their expired
        # leases, a dead generator's streams through retries.
        if any(k["kind"] == "job" and k["in_flight"] for k in kills):
            assert endings["lease_expired"] >= 1, (kills, endings)
        assert retry_reasons["GENERATOR_UNAVAILABLE"] >= 1, (kills, retry_reasons)
        print(
            f"\nchaos: {len(job_ids)} jobs, kills {kills}, lease_expired {endings['lease_expired']}, "
            f"retries {dict(retry_reasons)}, attempts {dict(Counter(r['attempt'] for r in rows.values()))}, "
            f"{time.monotonic() - began:.1f} s"
        )
    finally:
        await close_clients(c for _, c in clients)
        await conn.close()
        await stop(everything)
