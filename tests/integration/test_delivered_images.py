"""Delivered images are the user's: an image whose IMAGE_STORED committed is kept and charged once, whatever the
job's end (COMPLETED, FAILED or CANCELLED), and a retry asks only for the images still owed.

Both services run in-process (real gRPC, real PostgreSQL, local storage served over HTTP); the provider is the
Gemini image fake, which answers one image per request, so each request can be told apart: answered, held until
the test lets it fail, or left hanging until a cancel closes it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from tests.generator.fake_google import FakeGeminiImage, google_error, hang
from tests.generator.fake_http import Exchange, Reply
from tests.support.cluster import eventually
from tests.support.ledger import assert_credits_consistent
from tests.support.services import new_user, running_services

MODEL = "gemini-2.5-flash-image"
PRICE = 5
Fault = Callable[[Exchange], Awaitable[Reply]]


@pytest.fixture
async def api() -> AsyncIterator[FakeGeminiImage]:
    fake = FakeGeminiImage()
    await fake.start()
    yield fake
    await fake.stop()


def answered(api: FakeGeminiImage) -> Fault:
    """A request answered as usual (one image)."""
    return api.answer


def failing_when(gate: asyncio.Event, status: int, google_status: str) -> Fault:
    """A request held until `gate` is set, then answered with an error."""

    async def answer(_exchange: Exchange) -> Reply:
        await gate.wait()
        return google_error(status, google_status, "the model is overloaded" if status >= 500 else "bad request")

    return answer


def generator_settings(api: FakeGeminiImage) -> dict[str, object]:
    # No retry inside the generator: a failed provider request fails the attempt, and JobService decides.
    return {"gemini_api_key": api.api_key, "gemini_base_url": api.url, "provider_max_retries": 0}


def job_settings(**overrides: object) -> dict[str, object]:
    return {"model_prices": {MODEL: PRICE}, **overrides}


async def ledger(db: asyncpg.Connection, job_id: str) -> list[tuple[str, int, int]]:
    rows = await db.fetch("SELECT kind, amount, images FROM credit_ledger WHERE job_id = $1 ORDER BY id", job_id)
    return [(r["kind"], r["amount"], r["images"]) for r in rows]


async def images_stored(db: asyncpg.Connection, job_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM job_events WHERE job_id = $1 AND type = 'image_stored'", job_id))


async def assert_downloadable(images: list[pb.Image]) -> None:
    async with httpx.AsyncClient() as http:
        for image in images:
            response = await http.get(image.url)
            assert response.status_code == 200, image.url
            assert len(response.content) == image.size_bytes
            assert Image.open(io.BytesIO(response.content)).format == "PNG"


def files(job: pb.Job) -> list[str]:
    """The images' object names ({attempt}-{index}.png), in the job's order."""
    return [image.storage_path.rsplit("/", 1)[-1] for image in job.images]


async def test_a_job_cancelled_after_its_third_image_keeps_and_pays_for_those_three(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, api: FakeGeminiImage
) -> None:
    # Three requests answer at once; the fourth hangs until the cancel closes it.
    api.faults.extend([answered(api)] * 3 + [hang(120)])
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job=job_settings(), generator=generator_settings(api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=MODEL, sample_count=4)
        assert created.credits_reserved == 4 * PRICE
        stored = await eventually(lambda: images_stored(db, created.id), lambda n: n == 3, within=30)
        assert stored == 3
        await client.cancel_job(created.id)
        done = await client.wait(created.id, timeout=30)
        fetched = await client.get_job(created.id)
        balance = await client.credit_balance()
        await assert_downloadable(list(fetched.images))  # while the storage server runs

    assert done.state == pb.JOB_STATE_CANCELLED
    assert (done.credits_charged, done.credits_reserved) == (3 * PRICE, 0)
    assert fetched.credits_charged == 3 * PRICE
    assert [image.index for image in fetched.images] == [0, 1, 2]
    assert all(name.startswith("1-") for name in files(fetched)) and len(set(files(fetched))) == 3
    assert await eventually(lambda: asyncio.sleep(0, api.http.disconnects), lambda n: n == 1, within=15) == 1
    assert await ledger(db, created.id) == [
        ("reserve", -4 * PRICE, 4),
        ("release", 4 * PRICE, 0),
        ("capture", -3 * PRICE, 3),
    ]
    assert balance.balance == 100 - 3 * PRICE
    await assert_credits_consistent(db)


async def test_a_retry_asks_only_for_the_images_the_failed_attempt_did_not_deliver(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, api: FakeGeminiImage
) -> None:
    # Attempt 1: two images, then a 503 once both are stored (a retryable failure). Attempt 2 is answered.
    gate = asyncio.Event()
    api.faults.extend([answered(api)] * 2 + [failing_when(gate, 503, "UNAVAILABLE")] * 2)
    user = new_user()
    async with (
        running_services(database_url, tmp_path, job=job_settings(), generator=generator_settings(api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=MODEL, sample_count=4)
        assert await eventually(lambda: images_stored(db, created.id), lambda n: n == 2, within=30) == 2
        gate.set()
        done = await client.wait(created.id, timeout=60)
        balance = await client.credit_balance()
        await assert_downloadable(list(done.images))

    assert done.state == pb.JOB_STATE_COMPLETED and done.attempt == 2
    assert len(api.requests) == 4 + 2, "the second attempt asked for the two images still owed"
    assert [image.index for image in done.images] == [0, 1, 2, 3]
    names = files(done)
    assert all(name.startswith("1-") for name in names[:2]) and sorted(names[2:]) == ["2-0.png", "2-1.png"]
    assert (done.credits_charged, done.filtered_count) == (4 * PRICE, 0)
    assert await ledger(db, created.id) == [
        ("reserve", -4 * PRICE, 4),
        ("release", 4 * PRICE, 0),
        ("capture", -4 * PRICE, 4),
    ]
    assert balance.balance == 100 - 4 * PRICE
    # The first attempt's error is gone from the completed job, for GetJob and for Realtime readers of the row.
    assert not done.HasField("error")
    row = await db.fetchrow("SELECT error_code, error_message, status FROM generation_jobs WHERE id = $1", done.id)
    assert (row["status"], row["error_code"], row["error_message"]) == ("completed", None, None)
    retried = await db.fetchval(
        "SELECT detail ->> 'error_code' FROM job_events WHERE job_id = $1 AND type = 'retry_scheduled'", done.id
    )
    assert retried == "PROVIDER_UNAVAILABLE"
    await assert_credits_consistent(db)


@pytest.mark.parametrize(
    ("status", "google_status", "max_attempts", "reason"),
    [(503, "UNAVAILABLE", 1, "PROVIDER_UNAVAILABLE"), (400, "INVALID_ARGUMENT", 5, "PROVIDER_REJECTED")],
    ids=["out-of-attempts", "not-retryable"],
)
async def test_a_job_that_fails_after_delivering_images_is_charged_for_them(
    database_url: str,
    tmp_path: Path,
    db: asyncpg.Connection,
    api: FakeGeminiImage,
    status: int,
    google_status: str,
    max_attempts: int,
    reason: str,
) -> None:
    gate = asyncio.Event()
    api.faults.extend([answered(api)] * 2 + [failing_when(gate, status, google_status)] * 2)
    user = new_user()
    settings = job_settings(max_attempts=max_attempts)
    async with (
        running_services(database_url, tmp_path, job=settings, generator=generator_settings(api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=MODEL, sample_count=4)
        assert await eventually(lambda: images_stored(db, created.id), lambda n: n == 2, within=30) == 2
        gate.set()
        done = await client.wait(created.id, timeout=60)
        await assert_downloadable(list(done.images))

    assert done.state == pb.JOB_STATE_FAILED and done.error.reason == reason
    assert (done.attempt, len(api.requests)) == (1, 4)
    assert [image.index for image in done.images] == [0, 1]
    assert (done.credits_charged, done.credits_reserved) == (2 * PRICE, 0)
    assert await ledger(db, created.id) == [
        ("reserve", -4 * PRICE, 4),
        ("release", 4 * PRICE, 0),
        ("capture", -2 * PRICE, 2),
    ]
    await assert_credits_consistent(db)


async def test_a_premium_user_pays_nothing_for_a_failed_job_but_its_delivered_images_are_counted(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, api: FakeGeminiImage
) -> None:
    gate = asyncio.Event()
    api.faults.extend([answered(api)] * 2 + [failing_when(gate, 400, "INVALID_ARGUMENT")] * 2)
    user = new_user()
    settings = job_settings(new_user_credits=0)
    async with running_services(database_url, tmp_path, job=settings, generator=generator_settings(api)) as services:
        async with services.service_client() as admin:
            await admin.grant_credits(user, 1, reason="premium plan", premium=True)
        async with services.client(user) as client:
            created = await client.create_job("a lighthouse at dusk", model=MODEL, sample_count=4)
            assert await eventually(lambda: images_stored(db, created.id), lambda n: n == 2, within=30) == 2
            gate.set()
            done = await client.wait(created.id, timeout=60)
            balance = await client.credit_balance()

    assert done.state == pb.JOB_STATE_FAILED and len(done.images) == 2
    assert (done.credits_reserved, done.credits_charged) == (0, 0)
    assert await ledger(db, created.id) == [("reserve", 0, 4), ("release", 0, 0), ("capture", 0, 2)]
    assert (balance.balance, balance.premium) == (1, True)
    await assert_credits_consistent(db)


async def test_a_pending_job_cancelled_between_attempts_pays_for_what_its_failed_attempt_delivered(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, api: FakeGeminiImage
) -> None:
    gate = asyncio.Event()
    api.faults.extend([answered(api), failing_when(gate, 503, "UNAVAILABLE")])
    user = new_user()
    # The retry is due a minute later: the job waits PENDING with the image of its first attempt.
    settings = job_settings(retry_base_seconds=60.0, retry_max_seconds=60.0)
    async with (
        running_services(database_url, tmp_path, job=settings, generator=generator_settings(api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=MODEL, sample_count=2)
        assert await eventually(lambda: images_stored(db, created.id), lambda n: n == 1, within=30) == 1
        gate.set()
        waiting = await eventually(
            lambda: client.get_job(created.id), lambda job: job.state == pb.JOB_STATE_PENDING, within=30
        )
        assert waiting.state == pb.JOB_STATE_PENDING and len(waiting.images) == 1
        cancelled = await client.cancel_job(created.id)
        await assert_downloadable(list(cancelled.images))

    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert (cancelled.credits_charged, len(cancelled.images)) == (PRICE, 1)
    assert await ledger(db, created.id) == [
        ("reserve", -2 * PRICE, 2),
        ("release", 2 * PRICE, 0),
        ("capture", -PRICE, 1),
    ]
    await assert_credits_consistent(db)
