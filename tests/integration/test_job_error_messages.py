"""What a user reads when a job fails: the stable reason and a plain sentence, never the provider's own text;
and a provider image that cannot be used fails the job without another paid call.

Both services run for real (tests.support.services) with the generator's Imagen model on a fake Gemini API
that answers with Google's error body. That body names the caller's billing project, as real ones do; the
user-facing `Job.error.message` and event messages must not carry it, and the JobService log must.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from imagegen.job.v1 import job_service_pb2 as pb

from generator_service.config import ModelSpec
from job_service.failure_messages import user_message
from tests.generator.fake_google import FakeGeminiImagen, fail, flat_png, image_bytes, imagen_answer
from tests.support.cluster import events_of
from tests.support.services import new_user, running_services

IMAGEN = "gemini-api/imagen-4.0-generate-001"
BILLING_TEXT = (
    "Imagen API has not been used in project acme-billing-prod-4471 before or it is disabled, and billing "
    "account 01A2B3-C4D5E6-F7A8B9 for project acme-billing-prod-4471 is closed."
)
SECRET_WORDS = ("acme-billing-prod-4471", "01A2B3-C4D5E6-F7A8B9", "billing")


@pytest.fixture
async def imagen_api() -> AsyncIterator[FakeGeminiImagen]:
    fake = FakeGeminiImagen()
    await fake.start()
    yield fake
    await fake.stop()


def imagen_generator(api: FakeGeminiImagen) -> dict[str, Any]:
    return {
        "gemini_api_key": api.api_key,
        "gemini_base_url": api.url,
        "provider_max_retries": 0,  # one provider call per attempt: the attempts are JobService's
        "models": [
            ModelSpec(id="local", provider="local", display_name="local"),
            ModelSpec(
                id=IMAGEN, provider="gemini-imagen", provider_model="imagen-4.0-generate-001", display_name="Imagen 4"
            ),
        ],
    }


async def failed_job(
    database_url: str, tmp_path: Path, api: FakeGeminiImagen
) -> tuple[pb.Job, pb.Job, list[pb.JobEvent], list[MutableMapping[str, Any]]]:
    """Runs one job to its end; returns GetJob's answer, the job as watched, the watched events and the log."""
    with structlog.testing.capture_logs() as logs:
        async with (
            running_services(
                database_url, tmp_path, job={"max_attempts": 2}, generator=imagen_generator(api)
            ) as services,
            services.client(new_user()) as client,
        ):
            created = await client.create_job("a lighthouse at dusk", model=IMAGEN, sample_count=1)
            events: list[pb.JobEvent] = []
            watched = None
            async for update in client.watch(created.id):
                watched = update.job
                if update.HasField("event"):
                    events.append(update.event)
            got = await client.get_job(created.id)
    assert watched is not None
    return got, watched, events, logs


def assert_plain(text: str) -> None:
    assert not any(word in text.lower() for word in (w.lower() for w in SECRET_WORDS)), text


async def test_a_provider_refusal_naming_the_billing_project_reaches_the_user_as_a_plain_message(
    database_url: str, tmp_path: Path, imagen_api: FakeGeminiImagen
) -> None:
    imagen_api.faults.append(fail(403, "PERMISSION_DENIED", BILLING_TEXT))
    got, watched, events, logs = await failed_job(database_url, tmp_path, imagen_api)

    assert got.state == pb.JOB_STATE_FAILED
    assert (got.error.reason, got.error.message) == (
        "PROVIDER_PERMISSION_DENIED",
        "The image service is misconfigured for this model's provider.",
    )
    assert watched.error == got.error
    for event in events:
        assert_plain(event.message)
    assert len(imagen_api.requests) == 1  # not retryable: one attempt

    # The operator still has the whole story, tied to the job.
    logged = [line for line in logs if line.get("job_id") == got.id and BILLING_TEXT in str(line.get("error", ""))]
    assert logged, "the provider's full text is logged with the job id"
    assert logged[0]["reason"] == "PROVIDER_PERMISSION_DENIED"


async def test_a_provider_5xx_naming_the_billing_project_is_retried_and_still_not_shown(
    database_url: str, tmp_path: Path, imagen_api: FakeGeminiImagen, db: asyncpg.Connection
) -> None:
    imagen_api.faults.extend([fail(503, "UNAVAILABLE", BILLING_TEXT), fail(503, "UNAVAILABLE", BILLING_TEXT)])
    got, _watched, events, logs = await failed_job(database_url, tmp_path, imagen_api)

    assert got.state == pb.JOB_STATE_FAILED
    assert (got.error.reason, got.error.message) == ("PROVIDER_UNAVAILABLE", user_message("PROVIDER_UNAVAILABLE"))
    for event in events:
        assert_plain(event.message)
    # The whole history, as WatchJob replays it (a watch opened late sees only what follows).
    history = await events_of(db, got.id)
    retries = [e for e in history if e["type"] == "retry_scheduled"]
    assert [e["detail"]["message"] for e in retries] == ["The provider was unavailable."]
    for row in history:
        assert_plain(str(row["detail"]))
    assert len(imagen_api.requests) == 2  # retryable: both attempts ran
    logged = [line for line in logs if line.get("job_id") == got.id and BILLING_TEXT in str(line.get("error", ""))]
    assert [line["attempt"] for line in logged] == [1, 2]


async def test_an_unreadable_image_fails_the_job_after_one_paid_call(
    database_url: str, tmp_path: Path, imagen_api: FakeGeminiImagen
) -> None:
    imagen_api.faults.append(imagen_answer(flat_png(1024, 1024, rows=500)))  # truncated: passes verify()
    got, _watched, events, _logs = await failed_job(database_url, tmp_path, imagen_api)

    assert (got.error.reason, got.error.message) == (
        "PROVIDER_IMAGE_INVALID",
        "The provider sent an image that could not be read.",
    )
    assert len(imagen_api.requests) == 1, "not retried: another attempt is another paid call"
    assert [e.type for e in events].count(pb.JOB_EVENT_TYPE_RETRY_SCHEDULED) == 0
    assert (got.credits_charged, list(got.images)) == (0, [])


async def test_an_image_of_an_unexpected_size_completes_the_job_with_its_real_size(
    database_url: str, tmp_path: Path, imagen_api: FakeGeminiImagen
) -> None:
    imagen_api.faults.append(imagen_answer(image_bytes(1000, 700, "image/png")))  # a 1:1 request
    async with (
        running_services(database_url, tmp_path, generator=imagen_generator(imagen_api)) as services,
        services.client(new_user()) as client,
    ):
        created = await client.create_job("a lighthouse at dusk", model=IMAGEN, sample_count=1)
        done = await client.wait(created.id, timeout=60)

    assert done.state == pb.JOB_STATE_COMPLETED
    assert [(i.width, i.height) for i in done.images] == [(1000, 700)]
    assert len(imagen_api.requests) == 1
