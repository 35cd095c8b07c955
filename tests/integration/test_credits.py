"""Credits: reserved with the job, settled with its end, never more than the balance, balance == sum(ledger)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from generator_service.config import ModelSpec
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from imagegen_common.grpc_errors import from_grpc_error
from tests.generator.fake_google import FakeGeminiImagen
from tests.support.ledger import assert_credits_consistent
from tests.support.rpc_errors import failure_of
from tests.support.services import new_user, running_services

IMAGEN = "gemini-api/imagen-4.0-generate-001"


async def ledger(db: asyncpg.Connection, user: str) -> list[tuple[str, int, int]]:
    """The user's ledger rows as (kind, amount, images), oldest first."""
    rows = await db.fetch("SELECT kind, amount, images FROM credit_ledger WHERE user_id = $1 ORDER BY id", user)
    return [(r["kind"], r["amount"], r["images"]) for r in rows]


async def test_100_concurrent_creates_accept_exactly_what_40_credits_pay_for(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    settings = {"new_user_credits": 0, "active_jobs_per_user": 1000}
    async with running_services(database_url, tmp_path, job=settings) as services:
        async with services.service_client() as admin:
            granted = await admin.grant_credits(user, 40, reason="test")
        assert granted.balance == 40

        async with services.client(user) as client:
            outcomes = await asyncio.gather(
                *(client.create_job(f"burst {i}", sample_count=4, timeout=60) for i in range(100)),
                return_exceptions=True,
            )
            accepted = [o for o in outcomes if isinstance(o, pb.Job)]
            refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
            assert len(accepted) + len(refused) == 100, [
                o for o in outcomes if not isinstance(o, pb.Job | grpc.RpcError)
            ]
            finished = [await client.wait(job.id, timeout=60) for job in accepted]
            balance = await client.credit_balance()

    assert len(accepted) == 10
    assert all(job.credits_reserved == 4 for job in accepted)
    reasons = {(e.code(), from_grpc_error(e).reason) for e in refused}
    assert reasons == {(grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS")}
    assert len(refused) == 90
    assert [job.state for job in finished] == [pb.JOB_STATE_COMPLETED] * 10
    assert all(job.credits_charged == 4 for job in finished)
    assert (balance.balance, balance.reserved) == (0, 0)
    rows = await ledger(db, user)
    assert sorted({kind for kind, _, _ in rows}) == ["capture", "grant", "release", "reserve"]
    assert [kind for kind, _, _ in rows].count("reserve") == 10, "refused requests reserved nothing"
    assert sum(amount for _, amount, _ in rows) == 0
    assert await db.fetchval("SELECT count(*) FROM generation_jobs WHERE user_id = $1", user) == 10
    await assert_credits_consistent(db)


async def test_20_racing_retries_with_one_request_id_make_one_job_and_one_reservation(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path) as services, services.client(user) as client:
        jobs = await asyncio.gather(
            *(client.create_job("one job only", sample_count=3, request_id="order-7f3a", timeout=30) for _ in range(20))
        )
        done = await client.wait(jobs[0].id, timeout=60)
        again = await client.create_job("one job only", sample_count=3, request_id="order-7f3a")
        balance = await client.credit_balance()

    assert len({job.id for job in jobs}) == 1
    assert all(job.request_id == "order-7f3a" for job in jobs)
    assert again.id == done.id and again.state == pb.JOB_STATE_COMPLETED, "a late retry gets the job as it is now"
    assert await db.fetchval("SELECT count(*) FROM generation_jobs WHERE user_id = $1", user) == 1
    assert await ledger(db, user) == [
        ("grant", 100, 0),
        ("reserve", -3, 3),
        ("release", 3, 0),
        ("capture", -3, 3),
    ]
    assert balance.balance == 97
    await assert_credits_consistent(db)


@pytest.fixture
async def imagen_api() -> AsyncIterator[FakeGeminiImagen]:
    fake = FakeGeminiImagen()
    await fake.start()
    yield fake
    await fake.stop()


def imagen_generator(api: FakeGeminiImagen) -> dict[str, object]:
    """Generator settings serving one Imagen model through the `gemini-imagen` provider, on the fake."""
    return {
        "gemini_api_key": api.api_key,
        "gemini_base_url": api.url,
        "retry_backoff_initial_seconds": 0.01,
        "retry_backoff_max_seconds": 0.05,
        "models": [
            ModelSpec(id="local", provider="local", display_name="local", image_sizes=["1K", "2K"]),
            ModelSpec(
                id=IMAGEN,
                provider="gemini-imagen",
                provider_model="imagen-4.0-generate-001",
                display_name="Imagen 4",
                image_sizes=["1K", "2K"],
            ),
        ],
    }


async def test_safety_filtered_image_is_not_charged_and_the_job_says_why(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, imagen_api: FakeGeminiImagen
) -> None:
    imagen_api.filtered = {2}
    user = new_user()
    job_settings = {"model_prices": {IMAGEN: 5}}
    async with (
        running_services(database_url, tmp_path, job=job_settings, generator=imagen_generator(imagen_api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=IMAGEN, sample_count=4)
        done = await client.wait(created.id, timeout=60)
        balance = await client.credit_balance()

    assert created.credits_reserved == 20
    assert done.state == pb.JOB_STATE_COMPLETED
    # The job's index is the image's place in delivery order (0..n-1); the storage path keeps the sample's own.
    assert [image.index for image in done.images] == [0, 1, 2]
    assert sorted(image.storage_path.rsplit("/", 1)[-1] for image in done.images) == ["1-0.png", "1-1.png", "1-3.png"]
    assert done.filtered_count == 1
    assert list(done.filtered_reasons) == [imagen_api.filter_reason]
    assert done.credits_charged == 15 and done.credits_reserved == 0
    assert balance.balance == 100 - 15
    assert await ledger(db, user) == [
        ("grant", 100, 0),
        ("reserve", -20, 4),
        ("release", 20, 0),
        ("capture", -15, 3),
    ]
    await assert_credits_consistent(db)


async def test_failed_job_releases_everything(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, imagen_api: FakeGeminiImagen
) -> None:
    imagen_api.filtered = {0, 1}  # every image withheld: a permanent failure
    user = new_user()
    async with (
        running_services(database_url, tmp_path, generator=imagen_generator(imagen_api)) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=IMAGEN, sample_count=2)
        done = await client.wait(created.id, timeout=60)
        balance = await client.credit_balance()

    assert created.credits_reserved == 2
    assert done.state == pb.JOB_STATE_FAILED
    assert done.error.reason == "ALL_IMAGES_FILTERED"
    assert done.credits_charged == 0
    assert balance.balance == 100
    assert await ledger(db, user) == [("grant", 100, 0), ("reserve", -2, 2), ("release", 2, 0), ("capture", 0, 0)]
    await assert_credits_consistent(db)


async def test_premium_account_reserves_and_pays_nothing_but_usage_is_recorded(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path, job={"new_user_credits": 0}) as services:
        async with services.service_client() as admin:
            granted = await admin.grant_credits(user, 1, reason="premium plan", premium=True)
        async with services.client(user) as client:
            created = await client.create_job("premium picture", sample_count=4)
            done = await client.wait(created.id, timeout=60)
            balance = await client.credit_balance()

    assert granted.premium and granted.balance == 1
    assert created.credits_reserved == 0
    assert done.state == pb.JOB_STATE_COMPLETED and len(done.images) == 4
    assert done.credits_charged == 0
    assert (balance.balance, balance.premium) == (1, True)
    assert await ledger(db, user) == [
        ("grant", 1, 0),
        ("reserve", 0, 4),
        ("release", 0, 0),
        ("capture", 0, 4),
    ]
    await assert_credits_consistent(db)


async def test_prices_come_from_model_prices_and_the_templates_table(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    template_price = await db.fetchval("SELECT price_per_image FROM templates WHERE id = 'banner'")
    assert template_price == 2
    job_settings = {"model_prices": {"local": 3}, "default_price_per_image": 1}
    async with (
        running_services(database_url, tmp_path, job=job_settings) as services,
        services.client(user) as client,
    ):
        by_model = await client.create_job("priced by the model", sample_count=2)
        by_template = await client.create_job(
            template_id="banner", template_variables={"scene": "a harbour"}, sample_count=3
        )
        by_model_done = await client.wait(by_model.id, timeout=60)
        by_template_done = await client.wait(by_template.id, timeout=60)
        balance = await client.credit_balance()

    assert by_model.credits_reserved == 2 * 3
    assert by_template.credits_reserved == 3 * 2, "the template's price overrides the model's"
    assert by_model_done.credits_charged == 6
    assert by_template_done.credits_charged == 6
    assert balance.balance == 100 - 12
    await assert_credits_consistent(db)


async def test_cancelling_a_pending_job_releases_its_credits_at_once(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    # No dispatching: the job stays pending until it is cancelled.
    async with (
        running_services(database_url, tmp_path, job={"max_in_flight": 0}) as services,
        services.client(user) as client,
    ):
        created = await client.create_job("never mind", sample_count=4)
        during = await client.credit_balance()
        cancelled = await client.cancel_job(created.id)
        after = await client.credit_balance()

    assert (during.balance, during.reserved) == (96, 4)
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.credits_charged == 0
    assert (after.balance, after.reserved) == (100, 0)
    assert await ledger(db, user) == [("grant", 100, 0), ("reserve", -4, 4), ("release", 4, 0), ("capture", 0, 0)]
    await assert_credits_consistent(db)


async def test_the_ledger_is_append_only(database_url: str, tmp_path: Path, db: asyncpg.Connection) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path) as services, services.client(user) as client:
        await client.credit_balance()  # opens the account with its welcome grant
    before = await ledger(db, user)
    for statement in (
        "UPDATE credit_ledger SET amount = 1000000 WHERE user_id = $1",
        "DELETE FROM credit_ledger WHERE user_id = $1",
    ):
        with pytest.raises(asyncpg.PostgresError) as refused:
            await db.execute(statement, user)
        assert refused.value.sqlstate == "IG004", statement
    with pytest.raises(asyncpg.PostgresError) as truncate_refused:
        await db.execute("TRUNCATE credit_ledger CASCADE")
    assert truncate_refused.value.sqlstate == "IG004"
    assert await ledger(db, user) == before == [("grant", 100, 0)]


def anonymous_token(user: str) -> str:
    """A Supabase anonymous sign-in's access token: role authenticated, is_anonymous true."""
    return mint_token(DEV_JWT_SECRET, user_id=user, extra_claims={"is_anonymous": True})


async def test_anonymous_users_get_their_own_welcome_credits(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """An anonymous sign-in is free and repeatable: it must not open an account with JOB_NEW_USER_CREDITS."""
    anonymous, creator, signed_up = new_user(), new_user(), new_user()
    async with running_services(database_url, tmp_path) as services:  # the defaults: 100, and 0 for anonymous
        async with services.client(token=anonymous_token(anonymous)) as client:
            anonymous_balance = await client.credit_balance()
        async with services.client(token=anonymous_token(creator)) as client:
            refused = await failure_of(client.create_job("free pictures?", sample_count=1))
        async with services.client(signed_up) as client:
            signed_up_balance = await client.credit_balance()

    assert anonymous_balance.balance == 0
    assert (refused.code, refused.reason) == ("RESOURCE_EXHAUSTED", "INSUFFICIENT_CREDITS")
    assert signed_up_balance.balance == 100, "a normal user still gets JOB_NEW_USER_CREDITS"
    assert await ledger(db, anonymous) == [] and await ledger(db, creator) == []
    assert await ledger(db, signed_up) == [("grant", 100, 0)]

    generous = new_user()
    async with (
        running_services(database_url, tmp_path, job={"anonymous_user_credits": 3}) as services,
        services.client(token=anonymous_token(generous)) as client,
    ):
        generous_balance = await client.credit_balance()
    assert generous_balance.balance == 3
    assert await ledger(db, generous) == [("grant", 3, 0)]
    await assert_credits_consistent(db)
