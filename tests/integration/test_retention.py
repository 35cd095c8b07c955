"""Retention and DeleteJob: a job's objects leave storage first, then its row and events; its ledger rows stay.

Real PostgreSQL (a database per test: a retention pass deletes every old job it sees), both services as
server.start wires them, local storage served over HTTP or Supabase storage against the fake Storage server.
The sweep delay is 0 and the intervals short, so that a test need not wait 15 minutes; a job "ended days ago" is
one whose completed_at the test moved back.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from generator_service import server as generator_server
from imagegen_client import ImageGenClient, inline_image, job_image
from job_service.cleanup import CleanupStore, Sweeper, SweeperConfig
from job_service.generator_client import GeneratorClient
from job_service.retention import RetentionConfig, RetentionStore, RetentionSweeper
from job_service.store import JobStore, create_pool
from tests.generator.fake_google import FakeGeminiImage, hang
from tests.generator.fake_http import Exchange, Reply
from tests.generator.fake_supabase import FakeSupabaseStorage
from tests.support.cluster import eventually, fresh_database
from tests.support.ledger import assert_credits_consistent
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, generator_settings, new_user, running_services

TOKEN = "internal-token"
FAST: dict[str, Any] = {
    "cleanup_delay_seconds": 0.0,
    "cleanup_interval_seconds": 0.2,
    "cleanup_backoff_base_seconds": 0.2,
    "cleanup_backoff_max_seconds": 0.5,
    "retention_interval_seconds": 0.2,
    "generator_token": TOKEN,
}


@pytest.fixture
async def own_db(pg_server: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server) as url:
        yield url


@pytest.fixture
async def conn(own_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(own_db)
    yield connection
    await connection.close()


def supabase_generator(api: FakeSupabaseStorage) -> dict[str, Any]:
    return {
        "storage_backend": "supabase",
        "supabase_url": api.url,
        "supabase_service_key": "test-service-key",
        "storage_max_retries": 0,
        "auth_token": TOKEN,
    }


def keys_of(api: FakeSupabaseStorage, user: str, job: str) -> list[str]:
    return sorted(key for _bucket, key in api.objects if key.startswith(f"{user}/{job}/"))


def files_of(storage: Path, user: str, job: str) -> list[str]:
    folder = storage / "images" / user / job
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def age(conn: asyncpg.Connection, job_id: str, days: float) -> None:
    """The job ended `days` earlier than it did (as it would look that many days later)."""
    await conn.execute(
        "UPDATE generation_jobs SET completed_at = completed_at - make_interval(secs => $2) WHERE id = $1",
        job_id,
        days * 86_400,
    )


async def not_found(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    return caught.value


async def is_gone(client: ImageGenClient, job_id: str) -> bool:
    try:
        await client.get_job(job_id)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.NOT_FOUND
    return False


async def row_count(conn: asyncpg.Connection, job_id: str) -> tuple[int, int, int]:
    """(job rows, event rows, storage_cleanups rows) of the job."""
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM generation_jobs WHERE id = $1) AS jobs,
                  (SELECT count(*) FROM job_events WHERE job_id = $1) AS events,
                  (SELECT count(*) FROM storage_cleanups WHERE job_id = $1) AS cleanups""",
        job_id,
    )
    return (row["jobs"], row["events"], row["cleanups"])


async def detached_ledger(conn: asyncpg.Connection, user: str) -> list[tuple[str, int, int]]:
    rows = await conn.fetch(
        "SELECT kind, amount, images FROM credit_ledger WHERE user_id = $1 AND job_id IS NULL AND kind <> 'grant'"
        " ORDER BY id",
        user,
    )
    return [(r["kind"], r["amount"], r["images"]) for r in rows]


def metric(services: Services, name: str, **labels: str) -> float:
    assert services.job.registry is not None
    return services.job.registry.get_sample_value(name, labels or None) or 0.0


async def test_retention_deletes_the_images_then_the_job_and_every_balance_still_adds_up(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    user = new_user()
    settings = {**FAST, "image_retention_days": 1, "job_retention_days": 3}
    async with (
        running_services(own_db, storage, job=settings, generator={"auth_token": TOKEN}) as services,
        services.client(user) as client,
        httpx.AsyncClient() as http,
    ):
        old = await client.wait((await client.create_job("a lighthouse", model="local", sample_count=2)).id, timeout=60)
        new = await client.wait((await client.create_job("a harbour", model="local", sample_count=1)).id, timeout=60)
        assert old.state == new.state == pb.JOB_STATE_COMPLETED
        balance = (await client.credit_balance()).balance
        assert len(files_of(storage, user, old.id)) == 2
        for image in old.images:
            assert (await http.get(image.url)).status_code == 200

        # Two days later: past the images' retention (1 day), not the job's (3 days).
        await age(conn, old.id, days=2)
        assert services.job.retention is not None
        services.job.retention.wake()
        expired = await eventually(
            lambda: client.get_job(old.id), lambda j: j.HasField("images_delete_time"), within=15
        )
        assert expired.HasField("images_delete_time"), "GetJob says the images are deleted"
        assert [(i.index, i.url) for i in expired.images] == [(0, ""), (1, "")], "listed, with no URL that 404s"
        assert [i.storage_path for i in expired.images] == [i.storage_path for i in old.images]
        assert expired.state == pb.JOB_STATE_COMPLETED and expired.credits_charged == old.credits_charged
        row = await conn.fetchrow("SELECT result_urls, images FROM generation_jobs WHERE id = $1", old.id)
        assert row["result_urls"] == [], "nor in the row, for those who read it directly (Supabase Realtime)"
        assert "http" not in row["images"]
        listed = (await client.list_jobs()).jobs
        assert {j.id: j.HasField("images_delete_time") for j in listed} == {old.id: True, new.id: False}

        left = await eventually(lambda: asyncio.sleep(0, files_of(storage, user, old.id)), lambda f: f == [], within=15)
        assert left == [], "the objects are gone from storage"
        for image in old.images:
            assert (await http.get(image.url)).status_code == 404, "the image server answers gone"
        jobs, events, cleanups = await row_count(conn, old.id)
        assert (jobs, cleanups) == (1, 0) and events > 0, "the job stays, its sweep done"
        assert (await client.get_job(old.id)).HasField("images_delete_time")
        assert len(files_of(storage, user, new.id)) == 1, "a recent job keeps its images"
        assert (await http.get(new.images[0].url)).status_code == 200
        assert metric(services, "imagegen_retention_images_expired_total") == 1

        # Two more days: past the job's retention too. Its row and events go; its ledger rows stay, detached.
        await age(conn, old.id, days=2)
        services.job.retention.wake()
        assert await eventually(lambda: is_gone(client, old.id), bool, within=15)
        assert await row_count(conn, old.id) == (0, 0, 0)
        charged = old.credits_charged
        assert charged > 0
        assert await detached_ledger(conn, user) == [
            ("reserve", -charged, 2),
            ("release", charged, 0),
            ("capture", -charged, 2),
        ]
        assert (await client.credit_balance()).balance == balance, "deleting a job moves no credits"
        assert [j.id for j in (await client.list_jobs()).jobs] == [new.id]
        assert metric(services, "imagegen_retention_jobs_deleted_total", reason="retention") == 1
        assert (await client.get_job(new.id)).images[0].url == new.images[0].url
    await assert_credits_consistent(conn)


async def test_delete_job_removes_the_objects_then_the_row_and_hides_it_from_everyone_else(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    api = await FakeSupabaseStorage().start()
    user, other = new_user(), new_user()
    try:
        async with (
            running_services(own_db, tmp_path, job=FAST, generator=supabase_generator(api)) as services,
            services.client(user) as client,
            services.client(other) as intruder,
            services.service_client() as admin,
        ):
            job = await client.wait(
                (await client.create_job("a lighthouse", model="local", sample_count=2)).id, timeout=60
            )
            kept = await client.wait(
                (await client.create_job("a harbour", model="local", sample_count=1)).id, timeout=60
            )
            by_admin = await client.wait(
                (await client.create_job("a pier", model="local", sample_count=1)).id, timeout=60
            )
            balance = (await client.credit_balance()).balance
            assert len(keys_of(api, user, job.id)) == 2

            # Another user's job answers as a job that does not exist: nothing tells them it does.
            theirs = await not_found(intruder.delete_job(job.id))
            missing = str(uuid.uuid4())
            nobodys = await not_found(intruder.delete_job(missing))
            assert (theirs.details() or "").replace(job.id, missing) == nobodys.details()
            assert (await client.get_job(job.id)).state == pb.JOB_STATE_COMPLETED
            assert len(keys_of(api, user, job.id)) == 2

            await client.delete_job(job.id)
            await not_found(client.get_job(job.id))
            await not_found(client.delete_job(job.id))  # a second deletion: the job is not there any more
            await not_found(client.cancel_job(job.id))
            assert job.id not in [j.id for j in (await client.list_jobs()).jobs]

            left = await eventually(lambda: asyncio.sleep(0, keys_of(api, user, job.id)), lambda k: k == [], within=15)
            assert left == [], "the objects are gone from storage"
            rows = await eventually(lambda: row_count(conn, job.id), lambda r: r == (0, 0, 0), within=15)
            assert rows == (0, 0, 0), "then the job's row and events"
            charged = job.credits_charged
            assert charged > 0
            assert await detached_ledger(conn, user) == [
                ("reserve", -charged, 2),
                ("release", charged, 0),
                ("capture", -charged, 2),
            ]

            await admin.delete_job(by_admin.id)  # the service role deletes anyone's job
            await eventually(lambda: row_count(conn, by_admin.id), lambda r: r == (0, 0, 0), within=15)
            assert keys_of(api, user, by_admin.id) == []
            assert len(keys_of(api, user, kept.id)) == 1, "the user's other job keeps its image"
            assert (await client.credit_balance()).balance == balance
            assert metric(services, "imagegen_retention_jobs_deleted_total", reason="delete_job") == 2
        await assert_credits_consistent(conn)
    finally:
        await api.stop()


async def test_deleting_a_running_job_cancels_it_first_and_charges_what_it_delivered(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    api = FakeGeminiImage()
    await api.start()
    api.faults.extend([api.answer] * 3 + [hang(120)])  # three images at once, the fourth never comes
    model, price, user = "gemini-2.5-flash-image", 5, new_user()
    try:
        async with (
            running_services(
                own_db,
                tmp_path,
                job={**FAST, "model_prices": {model: price}},
                generator={"gemini_api_key": api.api_key, "gemini_base_url": api.url, "provider_max_retries": 0},
            ) as services,
            services.client(user) as client,
        ):
            job = await client.create_job("a lighthouse at dusk", model=model, sample_count=4)
            stored = await eventually(
                lambda: conn.fetchval(
                    "SELECT count(*) FROM job_events WHERE job_id = $1 AND type = 'image_stored'", job.id
                ),
                lambda n: n == 3,
                within=30,
            )
            assert stored == 3 and len(files_of(tmp_path, user, job.id)) == 3
            await client.delete_job(job.id)
            await not_found(client.get_job(job.id))

            assert await eventually(lambda: asyncio.sleep(0, api.http.disconnects), lambda n: n == 1, within=15) == 1
            rows = await eventually(lambda: row_count(conn, job.id), lambda r: r == (0, 0, 0), within=20)
            assert rows == (0, 0, 0)
            assert files_of(tmp_path, user, job.id) == []
            # Cancelled as CancelJob would: the three delivered images charged, the rest released.
            assert await detached_ledger(conn, user) == [
                ("reserve", -4 * price, 4),
                ("release", 4 * price, 0),
                ("capture", -3 * price, 3),
            ]
            assert (await client.credit_balance()).balance == 100 - 3 * price
        await assert_credits_consistent(conn)
    finally:
        await api.stop()


async def test_a_storage_failure_during_deletion_keeps_the_record_and_a_later_sweep_finishes_it(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    api = await FakeSupabaseStorage().start()

    async def server_error(_exchange: Exchange) -> Reply:
        return Reply(500, b"Internal Server Error")

    user = new_user()
    try:
        async with (
            running_services(own_db, tmp_path, job=FAST, generator=supabase_generator(api)) as services,
            services.client(user) as client,
        ):
            first = await client.create_job("a lighthouse", model="local", sample_count=2, request_id="lighthouse-1")
            job = await client.wait(first.id, timeout=60)
            api.list_faults.extend([server_error] * 500)  # storage is down
            await client.delete_job(job.id)
            replay = await failure_of(
                client.create_job("a lighthouse", model="local", sample_count=2, request_id="lighthouse-1")
            )
            assert (replay.code, replay.reason) == ("ALREADY_EXISTS", "JOB_DELETED"), "no new job, none shown"

            row = await eventually(
                lambda: conn.fetchrow("SELECT * FROM storage_cleanups WHERE job_id = $1", job.id),
                lambda r: r is not None and r["tries"] >= 3,
                within=20,
            )
            assert row is not None and row["tries"] >= 3 and not row["keep_all_recorded"], "kept, with its tries"
            assert row["last_error"].startswith("STORAGE_UNAVAILABLE")
            assert len(keys_of(api, user, job.id)) == 2, "nothing deleted yet"
            assert (await row_count(conn, job.id))[0] == 1, "the job's row waits for its objects"
            await not_found(client.get_job(job.id))
            assert metric(services, "imagegen_storage_cleanup_failures_total") >= 3

            api.list_faults.clear()  # storage is back
            rows = await eventually(lambda: row_count(conn, job.id), lambda r: r == (0, 0, 0), within=20)
            assert rows == (0, 0, 0)
            assert keys_of(api, user, job.id) == []
            again = await client.create_job("a lighthouse", model="local", sample_count=2, request_id="lighthouse-1")
            assert again.id != job.id, "once the row is gone its request_id is free again"
        await assert_credits_consistent(conn)
    finally:
        await api.stop()


class Recording:
    """A deleter that records every call and passes it on."""

    def __init__(self, inner: GeneratorClient, calls: list[str]) -> None:
        self._inner = inner
        self.calls = calls

    async def delete_job_objects(
        self, user_id: str, job_id: str, keep_paths: list[str], *, timeout_seconds: float
    ) -> list[str]:
        self.calls.append(job_id)
        return await self._inner.delete_job_objects(user_id, job_id, keep_paths, timeout_seconds=timeout_seconds)


class Counting:
    def __init__(self) -> None:
        self.expired = 0
        self.deleted = 0

    def images_expired(self, count: int) -> None:
        self.expired += count

    def jobs_deleted(self, reason: str, count: int) -> None:
        assert reason == "retention"
        self.deleted += count

    def objects_deleted(self, count: int) -> None:
        pass

    def sweep_failed(self) -> None:
        pass


async def test_retention_passes_on_two_replicas_at_once_delete_each_job_once(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    users = [new_user() for _ in range(3)]
    jobs: list[str] = []
    async with running_services(own_db, storage, job=FAST, generator={"auth_token": TOKEN}) as services:
        for n in range(24):
            async with services.client(users[n % 3]) as client:
                jobs.append((await client.create_job(f"picture {n}", model="local", sample_count=1)).id)
        await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM generation_jobs WHERE status = 'completed'"),
            lambda n: n == len(jobs),
            within=60,
        )
    balances = dict(await conn.fetch("SELECT user_id::text, balance FROM credit_accounts"))
    await conn.execute("UPDATE generation_jobs SET completed_at = completed_at - interval '10 days'")
    assert len([p for p in (storage / "images").rglob("*") if p.is_file()]) == len(jobs)

    generator = await generator_server.start(generator_settings(storage, auth_token=TOKEN))
    pools = [await create_pool(own_db, min_size=1, max_size=3, statement_cache_size=100) for _ in range(2)]
    clients = [GeneratorClient(f"127.0.0.1:{generator.port}", token=TOKEN) for _ in range(2)]
    calls: list[str] = []
    counters = [Counting(), Counting()]
    retention_config = RetentionConfig(image_retention_days=1, job_retention_days=2, interval_seconds=60, batch_size=5)
    sweep_config = SweeperConfig(
        delay_seconds=0.0,
        interval_seconds=0.05,
        batch_size=4,
        call_timeout_seconds=10.0,
        backoff_base_seconds=0.1,
        backoff_max_seconds=0.2,
    )
    sweepers = [
        Sweeper(CleanupStore(pool), Recording(generator_client, calls), sweep_config, counter)
        for pool, generator_client, counter in zip(pools, clients, counters, strict=True)
    ]
    retainers = [
        RetentionSweeper(RetentionStore(pool), retention_config, counter)
        for pool, counter in zip(pools, counters, strict=True)
    ]
    try:
        for sweeper in sweepers:
            sweeper.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Both replicas' passes run at the same moment, over and over, until every job is gone.
        while await conn.fetchval("SELECT count(*) FROM generation_jobs") and loop.time() < deadline:
            await asyncio.gather(*(retainer.pass_once() for retainer in retainers))
            await asyncio.sleep(0.05)
    finally:
        for sweeper in sweepers:
            await sweeper.stop()
        for generator_client in clients:
            await generator_client.close()
        for pool in pools:
            await pool.close()
        await generator.stop()
    assert await conn.fetchval("SELECT count(*) FROM generation_jobs") == 0
    assert await conn.fetchval("SELECT count(*) FROM job_events") == 0
    assert await conn.fetchval("SELECT count(*) FROM storage_cleanups") == 0
    assert sum(c.expired for c in counters) == len(jobs), "each job's images queued once"
    assert sum(c.deleted for c in counters) == len(jobs), "each job deleted once"
    assert sorted(calls) == sorted(jobs), "each job's folder swept once"
    assert [p for p in (storage / "images").rglob("*") if p.is_file()] == []
    assert dict(await conn.fetch("SELECT user_id::text, balance FROM credit_accounts")) == balances
    await assert_credits_consistent(conn)


async def test_deleting_a_job_whose_folder_is_being_swept_fences_that_sweep_and_its_row_waits(
    own_db: str, conn: asyncpg.Connection
) -> None:
    # A bare job row (in a database of its own: it has no ledger rows) that failed on its second attempt: the
    # trigger recorded a sweep that keeps its recorded image.
    user = str(uuid.uuid4())
    recorded = f"{user}/JOB/1-0.png"
    job = await conn.fetchval(
        """INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts, status, attempt)
           VALUES ($1, 'p', 'local', '{}', 3, 'generating', 2) RETURNING id::text""",
        user,
    )
    recorded = recorded.replace("JOB", job)
    await conn.execute(
        """UPDATE generation_jobs SET result_paths = ARRAY[$2], result_urls = ARRAY['http://x/' || $2],
               images = jsonb_build_array(jsonb_build_object('index', 0, 'url', 'http://x/' || $2,
                   'storage_path', $2, 'mime_type', 'image/png', 'width', 1, 'height', 1, 'size_bytes', 1))
           WHERE id = $1""",
        job,
        recorded,
    )
    await conn.execute("UPDATE generation_jobs SET status = 'failed', completed_at = now() WHERE id = $1", job)
    pool = await create_pool(own_db, min_size=1, max_size=2, statement_cache_size=100)
    cleanups, retention = CleanupStore(pool), RetentionStore(pool)
    try:
        taken = await cleanups.take_due(10, delay_seconds=0, lease_seconds=60)
        assert [(c.job_id, c.keep_paths) for c in taken] == [(job, [recorded])], "a sweep keeping the image runs"

        assert await retention.mark_deleted(job) is True, "ended: its objects are queued at once"
        assert not await cleanups.done(taken[0]), "the sweep in flight kept the image: it does not end the row"
        row = await conn.fetchrow("SELECT keep_all_recorded FROM storage_cleanups WHERE job_id = $1", job)
        assert row is not None and row["keep_all_recorded"] is False
        assert await conn.fetchval("SELECT result_urls FROM generation_jobs WHERE id = $1", job) == []

        assert await retention.delete_deleted(10) == 0, "the row waits while the objects are still to go"
        retaken = await cleanups.take_due(10, delay_seconds=0, lease_seconds=60)
        assert [(c.job_id, c.keep_paths) for c in retaken] == [(job, [])], "now nothing is kept"
        assert await retention.delete_deleted(10) == 0, "nor while the sweep runs"
        assert await cleanups.done(retaken[0])
        assert await retention.delete_deleted(10) == 1, "gone from storage: the row goes"
        assert await row_count(conn, job) == (0, 0, 0)
        assert await retention.mark_deleted(job) is None
    finally:
        await pool.close()


# -- input images (job_input_blobs) -------------------------------------------------------------------------------


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


async def stored_inputs(conn: asyncpg.Connection, user: str) -> set[str]:
    """The sha256 of every input image of the user still stored."""
    return {r["sha256"] for r in await conn.fetch("SELECT sha256 FROM job_input_blobs WHERE user_id = $1", user)}


async def age_inputs(conn: asyncpg.Connection, user: str, hours: float) -> None:
    """The user's input images were stored `hours` earlier than they were (past the orphan sweep's grace)."""
    await conn.execute(
        "UPDATE job_input_blobs SET created_at = created_at - make_interval(secs => $2) WHERE user_id = $1",
        user,
        hours * 3600,
    )


async def test_a_deleted_jobs_input_images_go_with_its_row_unless_another_job_names_them(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    user = new_user()
    red, green = png((255, 0, 0)), png((0, 255, 0))
    red_sha, green_sha = hashlib.sha256(red).hexdigest(), hashlib.sha256(green).hexdigest()
    async with running_services(own_db, tmp_path, job=FAST) as services, services.client(user) as client:
        jobs = []
        for inputs in ([red], [red], [green]):  # the first two share one stored image
            made = await client.create_job(
                "paint it", model="local", sample_count=1, input_images=[inline_image(i) for i in inputs]
            )
            jobs.append(await client.wait(made.id, timeout=60))
        assert [j.state for j in jobs] == [pb.JOB_STATE_COMPLETED] * 3, [j.error for j in jobs]
        first, second, third = jobs
        assert await stored_inputs(conn, user) == {red_sha, green_sha}
        await age_inputs(conn, user, 2)  # as it would be two hours later: no create can be storing them now

        await client.delete_job(first.id)
        await eventually(lambda: row_count(conn, first.id), lambda r: r == (0, 0, 0), within=15)
        assert await stored_inputs(conn, user) == {red_sha, green_sha}, "the second job still names the red image"
        assert (await client.get_job(second.id)).state == pb.JOB_STATE_COMPLETED

        await client.delete_job(third.id)
        await eventually(lambda: row_count(conn, third.id), lambda r: r == (0, 0, 0), within=15)
        assert await stored_inputs(conn, user) == {red_sha}, "the green image went with the only job naming it"

        await client.delete_job(second.id)
        await eventually(lambda: row_count(conn, second.id), lambda r: r == (0, 0, 0), within=15)
        assert await stored_inputs(conn, user) == set()


async def test_the_input_images_of_a_refused_create_are_swept_once_no_create_can_still_need_them(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    user = new_user()
    kept, refused, orphan = png((0, 0, 255)), png((255, 255, 0)), png((0, 255, 255))
    job_settings = {**FAST, "create_rate_per_user": 1, "create_rate_window_seconds": 3600.0}
    async with running_services(own_db, tmp_path, job=job_settings) as services, services.client(user) as client:
        job = await client.wait(
            (await client.create_job("a", model="local", sample_count=1, input_images=[inline_image(kept)])).id,
            timeout=60,
        )
        assert job.state == pb.JOB_STATE_COMPLETED, job.error
        failure = await failure_of(
            client.create_job("b", model="local", sample_count=1, input_images=[inline_image(refused)])
        )
        assert failure.reason == "RATE_LIMITED"
        kept_sha, orphan_sha = hashlib.sha256(kept).hexdigest(), hashlib.sha256(orphan).hexdigest()
        # The refused create deleted what it stored when it ended (job_service/input_holds.py).
        assert await stored_inputs(conn, user) == {kept_sha}
        # A create that died between storing its images and inserting its job never released them: within the
        # grace they stay (it could still be running, on another replica), however many passes run.
        await JobStore(services.job.pool).put_input_blobs(user, [(orphan_sha, "image/png", orphan)])
        await asyncio.sleep(1.0)  # five retention passes at 0.2 s
        assert await stored_inputs(conn, user) == {kept_sha, orphan_sha}

        await age_inputs(conn, user, 2)
        left = await eventually(lambda: stored_inputs(conn, user), lambda s: orphan_sha not in s, within=15)
        assert left == {kept_sha}, "the job's own input image is kept: the job names it"
        assert (await client.get_job(job.id)).state == pb.JOB_STATE_COMPLETED


async def test_an_image_of_a_deleted_job_or_past_its_retention_cannot_be_an_input(
    own_db: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    user = new_user()
    async with (
        running_services(own_db, tmp_path, job={**FAST, "image_retention_days": 1.0}) as services,
        services.client(user) as client,
    ):
        deleted, expired = [
            await client.wait((await client.create_job(p, model="local", sample_count=1)).id, timeout=60)
            for p in ("a door", "a window")
        ]
        await client.delete_job(deleted.id)
        await age(conn, expired.id, 2)
        shown = await eventually(
            lambda: client.get_job(expired.id), lambda j: j.HasField("images_delete_time"), within=15
        )
        assert shown.HasField("images_delete_time")
        balance = await client.credit_balance()

        failure = await failure_of(
            client.create_job("edit", model="local", sample_count=1, input_images=[job_image(deleted.id, 0)])
        )
        assert failure.violations == {"input_images[0].job_image": f"no job {deleted.id} of yours"}
        failure = await failure_of(
            client.create_job("edit", model="local", sample_count=1, input_images=[job_image(expired.id, 0)])
        )
        assert failure.violations == {
            "input_images[0].job_image": f"the images of job {expired.id} were deleted (retention)"
        }
        assert (await client.credit_balance()).reserved == balance.reserved == 0
