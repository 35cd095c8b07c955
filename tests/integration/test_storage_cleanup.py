"""The storage sweeper: what ended jobs left in the bucket and no job row records is deleted, and only that.

Real PostgreSQL, the real generator (local storage, or Supabase storage against the fake Storage server) and
JobService as server.start wires it; the sweep delay is 0 here so that a test need not wait 15 minutes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from generator_service import server as generator_server
from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from job_service import server as job_server
from job_service.cleanup import CleanupStore, Sweeper, SweeperConfig
from job_service.generator_client import GeneratorClient
from job_service.store import create_pool
from tests.generator.fake_http import Exchange, Reply
from tests.generator.fake_supabase import FakeSupabaseStorage
from tests.support.cluster import eventually, fresh_database
from tests.support.processes import free_port
from tests.support.services import generator_settings, job_settings, running_services

TOKEN = "internal-token"
SWEEP_NOW: dict[str, Any] = {
    "cleanup_delay_seconds": 0.0,
    "cleanup_interval_seconds": 0.2,
    "cleanup_backoff_base_seconds": 0.2,
    "cleanup_backoff_max_seconds": 0.5,
}


@pytest.fixture
async def own_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


class FirstImageAnswerLost(FakeSupabaseStorage):
    """Storage that stores every image, but answers the upload of image 0 with a 500 a moment after storing it.

    What a proxy timing out after the write, or a connection that broke before the answer, looks like: the
    object is in the bucket, the generator saw the upload fail, so no IMAGE_STORED event records it (an orphan),
    and the attempt fails, retryably, after its other images (stored and answered at once) were recorded.
    """

    async def _handle(self, exchange: Exchange) -> Reply:
        request = exchange.request
        stored = await super()._handle(exchange)
        if request.method == "POST" and request.path.endswith("-0.png") and "/object/sign/" not in request.path:
            await asyncio.sleep(0.3)
            return Reply(500, b"Internal Server Error")
        return stored


def supabase_generator(api: FakeSupabaseStorage, **overrides: Any) -> dict[str, Any]:
    return {
        "storage_backend": "supabase",
        "supabase_url": api.url,
        "supabase_service_key": "test-service-key",
        "storage_max_retries": 0,
        "auth_token": TOKEN,
        **overrides,
    }


def keys_of(api: FakeSupabaseStorage, user: str, job: str) -> list[str]:
    return sorted(key for _bucket, key in api.objects if key.startswith(f"{user}/{job}/"))


async def recorded_paths(conn: asyncpg.Connection, job: str) -> list[str]:
    return sorted(await conn.fetchval("SELECT result_paths FROM generation_jobs WHERE id = $1", job))


async def fail_a_job(client: ImageGenClient) -> pb.Job:
    """A job of 3 images with 2 attempts: attempt 1 delivers images 1 and 2 and leaves 1-0 behind, attempt 2 (for
    the one image still owed) leaves 2-0 behind, and the job fails."""
    job = await client.create_job("a lighthouse at dusk", model="local", sample_count=3)
    done = await client.wait(job.id, timeout=60)
    assert done.state == pb.JOB_STATE_FAILED
    return done


async def test_a_failed_job_leaves_nothing_in_the_bucket_that_it_does_not_record(own_db: str, tmp_path: Path) -> None:
    api = await FirstImageAnswerLost().start()
    user = str(uuid.uuid4())
    conn = await asyncpg.connect(own_db)
    try:
        async with running_services(
            own_db,
            tmp_path / "storage",
            job={"max_attempts": 2, "generator_token": TOKEN, **SWEEP_NOW},
            generator=supabase_generator(api),
        ) as services:
            async with services.client(user) as client:
                job = await fail_a_job(client)
            recorded = await recorded_paths(conn, job.id)
            assert recorded == [f"{user}/{job.id}/1-1.png", f"{user}/{job.id}/1-2.png"], "what attempt 1 delivered"
            # Left behind: 1-0 and 2-0 (the sweep may already have begun: the delay is 0 here; the count of objects
            # deleted below says they were there).

            left = await eventually(
                lambda: asyncio.sleep(0, keys_of(api, user, job.id)), lambda k: k == recorded, within=15
            )
            assert left == recorded, "the unrecorded images of attempts 1 and 2 are gone, the recorded ones stay"
            # The row goes once the generator has answered: just after the objects.
            rows = await eventually(
                lambda: conn.fetchval("SELECT count(*) FROM storage_cleanups"), lambda n: n == 0, within=5
            )
            assert rows == 0
            assert services.job.registry is not None
            deleted = services.job.registry.get_sample_value("imagegen_storage_cleanup_objects_deleted_total")
            assert deleted == 2, "1-0 and 2-0"
        async with httpx.AsyncClient() as http:
            for path in recorded:
                kept = await http.get(f"{api.url}/storage/v1/object/public/images/{path}")
                assert kept.status_code == 200
    finally:
        await conn.close()
        await api.stop()


async def test_a_killed_attempts_objects_go_and_the_delivered_ones_stay_and_still_download(
    own_db: str, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    port = free_port()  # the generator is down at first: the first attempts fail, uncounted
    jobs = await job_server.start(
        job_settings(own_db, f"127.0.0.1:{port}", retry_base_seconds=0.1, retry_max_seconds=0.3, **SWEEP_NOW)
    )
    user = str(uuid.uuid4())
    conn = await asyncpg.connect(own_db)
    try:
        async with ImageGenClient(f"127.0.0.1:{jobs.port}", mint_token(DEV_JWT_SECRET, user_id=user)) as client:
            job = await client.create_job("a lighthouse at dusk", model="local", sample_count=2)
            # What attempt 1 stored before its replica was killed (its events never written).
            folder = storage / "images" / user / job.id
            folder.mkdir(parents=True)
            for name in ("1-0.png", "1-1.png"):
                (folder / name).write_bytes(b"an attempt that was killed")
            await eventually(
                lambda: conn.fetchval("SELECT attempt FROM generation_jobs WHERE id = $1", job.id),
                lambda attempt: attempt >= 2,
                within=10,
            )
            generator = await generator_server.start(generator_settings(storage, port=port))
            try:
                done = await client.wait(job.id, timeout=60)
                assert done.state == pb.JOB_STATE_COMPLETED and len(done.images) == 2
                delivered = sorted(image.storage_path for image in done.images)
                assert all(not path.split("/")[-1].startswith("1-") for path in delivered)

                def files() -> list[str]:
                    return sorted(f"{user}/{job.id}/{p.name}" for p in folder.iterdir())

                left = await eventually(lambda: asyncio.sleep(0, files()), lambda f: f == delivered, within=15)
                assert left == delivered
                async with httpx.AsyncClient() as http:
                    for image in done.images:
                        fetched = await http.get(image.url)
                        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
            finally:
                await generator.stop()
        rows = await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM storage_cleanups"), lambda n: n == 0, within=5
        )
        assert rows == 0
    finally:
        await conn.close()
        await jobs.stop()


async def test_storage_failures_keep_the_row_with_its_error_and_a_later_sweep_succeeds(
    own_db: str, tmp_path: Path
) -> None:
    api = await FirstImageAnswerLost().start()

    async def hang(exchange: Exchange) -> Reply:
        await exchange.client_disconnected(within=5.0)
        return Reply(500, b"too late")

    async def server_error(exchange: Exchange) -> Reply:
        return Reply(500, b"Internal Server Error")

    api.list_faults.extend([hang, *[server_error] * 200])  # a timeout, then 500s until storage is back
    user = str(uuid.uuid4())
    conn = await asyncpg.connect(own_db)
    try:
        async with running_services(
            own_db,
            tmp_path / "storage",
            job={"max_attempts": 2, "generator_token": TOKEN, **SWEEP_NOW},
            generator=supabase_generator(api, storage_timeout_seconds=0.5),
        ) as services:
            async with services.client(user) as client:
                job = await fail_a_job(client)

            row = await eventually(
                lambda: conn.fetchrow("SELECT * FROM storage_cleanups WHERE job_id = $1", job.id),
                lambda r: r is not None and r["tries"] >= 3,
                within=20,
            )
            assert row is not None and row["tries"] >= 3, "each failed sweep counted, the row kept"
            assert row["last_error"].startswith("STORAGE_UNAVAILABLE")
            assert len(row["last_error"]) <= 1000
            recorded = await recorded_paths(conn, job.id)
            orphans = [f"{user}/{job.id}/1-0.png", f"{user}/{job.id}/2-0.png"]
            assert keys_of(api, user, job.id) == sorted([*orphans, *recorded]), "nothing deleted yet"
            assert services.job.registry is not None
            failures = services.job.registry.get_sample_value("imagegen_storage_cleanup_failures_total")
            assert failures is not None and failures >= 3

            api.list_faults.clear()  # storage is back
            gone = await eventually(
                lambda: conn.fetchval("SELECT count(*) FROM storage_cleanups WHERE job_id = $1", job.id),
                lambda n: n == 0,
                within=10,
            )
            assert gone == 0
            assert keys_of(api, user, job.id) == recorded
    finally:
        await conn.close()
        await api.stop()


class Recording:
    """A deleter that records every call (slowly, so that two sweepers overlap) and passes it on."""

    def __init__(self, inner: GeneratorClient, calls: list[str]) -> None:
        self._inner = inner
        self.calls = calls
        self.mine = 0

    async def delete_job_objects(
        self, user_id: str, job_id: str, keep_paths: list[str], *, timeout_seconds: float
    ) -> list[str]:
        self.calls.append(job_id)
        self.mine += 1
        await asyncio.sleep(0.05)
        return await self._inner.delete_job_objects(user_id, job_id, keep_paths, timeout_seconds=timeout_seconds)


class Counting:
    def __init__(self) -> None:
        self.deleted = 0
        self.failures = 0

    def objects_deleted(self, count: int) -> None:
        self.deleted += count

    def sweep_failed(self) -> None:
        self.failures += 1


async def test_two_sweepers_at_once_sweep_every_row_once_and_empty_the_table(own_db: str, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    conn = await asyncpg.connect(own_db)
    rows = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(30)]  # (job, user); the jobs are gone
    for job, user in rows:
        folder = storage / "images" / user / job
        folder.mkdir(parents=True)
        (folder / "1-0.png").write_bytes(b"orphan")
    await conn.executemany("INSERT INTO storage_cleanups (job_id, user_id) VALUES ($1, $2)", rows)
    generator = await generator_server.start(generator_settings(storage, auth_token=TOKEN))
    calls: list[str] = []
    config = SweeperConfig(
        delay_seconds=0.0,
        interval_seconds=0.05,
        batch_size=4,
        call_timeout_seconds=10.0,
        backoff_base_seconds=0.1,
        backoff_max_seconds=0.2,
    )
    pools = [await create_pool(own_db, min_size=1, max_size=2, statement_cache_size=100) for _ in range(2)]
    clients = [GeneratorClient(f"127.0.0.1:{generator.port}", token=TOKEN) for _ in range(2)]
    deleters = [Recording(client, calls) for client in clients]
    observers = [Counting(), Counting()]
    sweepers = [
        Sweeper(CleanupStore(pool), deleter, config, observer)
        for pool, deleter, observer in zip(pools, deleters, observers, strict=True)
    ]
    try:
        for sweeper in sweepers:
            sweeper.start()
        left = await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM storage_cleanups"), lambda n: n == 0, within=20
        )
        assert left == 0
    finally:
        for sweeper in sweepers:
            await sweeper.stop()
        for client in clients:
            await client.close()
        for pool in pools:
            await pool.close()
        await generator.stop()
        await conn.close()
    assert sorted(calls) == sorted(job for job, _ in rows), "every row swept, none twice"
    assert all(deleter.mine > 0 for deleter in deleters), "both sweepers took rows"
    assert sum(observer.deleted for observer in observers) == 30
    assert [p for p in (storage / "images").rglob("*") if p.is_file()] == []


async def test_the_trigger_records_a_sweep_only_for_jobs_that_may_have_left_objects(own_db: str) -> None:
    # A database of its own: these bare job rows have no ledger rows, which the shared database's credit checks
    # would count against other tests.
    db = await asyncpg.connect(own_db)
    try:
        await check_the_trigger(db)
    finally:
        await db.close()


async def check_the_trigger(db: asyncpg.Connection) -> None:
    async def job_ending(status: str, attempt: int) -> bool:
        job = await db.fetchval(
            """INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts, status, attempt)
               VALUES ($1, 'p', 'local', '{}', 3, 'generating', $2) RETURNING id::text""",
            str(uuid.uuid4()),
            attempt,
        )
        await db.execute("UPDATE generation_jobs SET status = $2 WHERE id = $1", job, status)
        await db.execute("UPDATE generation_jobs SET status = $2 WHERE id = $1", job, status)  # no second row
        return bool(await db.fetchval("SELECT count(*) FROM storage_cleanups WHERE job_id = $1", job))

    assert not await job_ending("completed", 1), "completed by its first attempt: everything it stored is recorded"
    assert await job_ending("completed", 2), "an earlier attempt may have stored objects"
    assert await job_ending("failed", 1)
    assert await job_ending("cancelled", 1)
    assert not await job_ending("cancelled", 0), "never claimed: never reached a generator"
    assert not await job_ending("pending", 2), "not ended"
    row = await db.fetchrow("SELECT * FROM storage_cleanups ORDER BY created_at DESC LIMIT 1")
    assert row["keep_all_recorded"] and row["tries"] == 0 and row["last_error"] is None


async def test_a_folder_waits_for_the_delay_and_a_sweeper_whose_lease_ran_out_changes_nothing(
    own_db: str, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    job, user = str(uuid.uuid4()), str(uuid.uuid4())
    folder = storage / "images" / user / job
    folder.mkdir(parents=True)
    (folder / "1-0.png").write_bytes(b"orphan")
    conn = await asyncpg.connect(own_db)
    pool = await create_pool(own_db, min_size=1, max_size=2, statement_cache_size=100)
    generator = await generator_server.start(generator_settings(storage, auth_token=TOKEN))
    client = GeneratorClient(f"127.0.0.1:{generator.port}", token=TOKEN)
    store = CleanupStore(pool)
    try:
        await conn.execute("INSERT INTO storage_cleanups (job_id, user_id) VALUES ($1, $2)", job, user)
        # Ended just now: an attempt may still be storing into the folder.
        assert await store.take_due(10, delay_seconds=3600, lease_seconds=60) == []

        taken = await store.take_due(10, delay_seconds=0, lease_seconds=60)
        assert [c.job_id for c in taken] == [job]
        assert await store.take_due(10, delay_seconds=0, lease_seconds=60) == [], "leased: no one else takes it"

        # The lease is taken over (it ran out and another sweeper took the row, or a new request replaced it).
        await conn.execute(
            "UPDATE storage_cleanups SET not_before = now() - interval '1 second' WHERE job_id = $1", job
        )
        assert not await store.failed(taken[0], "late", 1.0)
        assert not await store.done(taken[0])
        row = await conn.fetchrow("SELECT tries, last_error FROM storage_cleanups WHERE job_id = $1", job)
        assert (row["tries"], row["last_error"]) == (0, None), "the stale sweeper changed nothing"

        retaken = await store.take_due(10, delay_seconds=0, lease_seconds=60)
        deleted = await client.delete_job_objects(user, job, retaken[0].keep_paths, timeout_seconds=10)
        assert deleted == [f"{user}/{job}/1-0.png"]
        assert await store.done(retaken[0])
        assert await conn.fetchval("SELECT count(*) FROM storage_cleanups") == 0
        assert not folder.exists()
    finally:
        await client.close()
        await generator.stop()
        await pool.close()
        await conn.close()
