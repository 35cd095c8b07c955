"""Supabase Storage guards: the service key never follows a redirect elsewhere, and the bucket is checked at start."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from generator_service.config import ConfigurationError, GeneratorSettings
from generator_service.server import start
from tests.generator.fake_http import Exchange, FakeHttpServer, Reply
from tests.generator.fake_supabase import FakeSupabaseStorage, storage_fault
from tests.generator.helpers import settings_for
from tests.generator.test_supabase_storage import PATH, upload_error


@pytest.fixture
async def elsewhere() -> AsyncIterator[FakeHttpServer]:
    """Another origin (another port) that records whatever reaches it."""

    async def answer(exchange: Exchange) -> Reply:
        return Reply.json({"Key": "stolen", "Id": "x"})

    server = await FakeHttpServer(answer).start()
    yield server
    await server.stop()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_an_upload_redirected_to_another_origin_fails_without_sending_it_the_key(
    supabase_storage_api: FakeSupabaseStorage, elsewhere: FakeHttpServer, status: int
) -> None:
    target = f"{elsewhere.url}/storage/v1/object/images/{PATH}"
    supabase_storage_api.upload_faults.append(storage_fault(Reply(status, b"", {"location": target})))

    error = await upload_error(supabase_storage_api)

    assert (error.reason, error.metadata["retryable"]) == ("STORAGE_REDIRECTED", "false")
    assert "redirect" in error.message and "GEN_SUPABASE_URL" in error.message and elsewhere.url in error.message
    # Not followed at all: the other origin saw nothing, so neither the key nor the image.
    assert elsewhere.requests == []
    assert len(supabase_storage_api.requests) == 1  # and not retried
    assert ("images", PATH) not in supabase_storage_api.objects


def supabase_settings(tmp_path: Path, api: FakeSupabaseStorage, **overrides: Any) -> GeneratorSettings:
    values: dict[str, Any] = {
        "storage_backend": "supabase",
        "supabase_url": api.url,
        "supabase_service_key": "test-service-key",
        "storage_bucket": "images",
    }
    values.update(overrides)
    return settings_for(tmp_path, **values)


async def start_error(settings: GeneratorSettings) -> tuple[Exception, list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as logs, pytest.raises(Exception) as refused:
        app = await start(settings)
        await app.stop()
    return refused.value, logs


async def test_a_private_bucket_with_public_urls_configured_refuses_to_start(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage
) -> None:
    supabase_storage_api.buckets = {"images": False}
    error, logs = await start_error(supabase_settings(tmp_path, supabase_storage_api, storage_public=True))

    assert isinstance(error, ConfigurationError)
    assert "GEN_STORAGE_PUBLIC" in str(error) and "private" in str(error)
    # The operator reads it in the log too, as one line naming the setting.
    refusals = [line for line in logs if line["event"] == "refusing to start"]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error"
    assert "GEN_STORAGE_PUBLIC=true" in str(refusals[0]["reason"])
    asked = [(r.method, r.path) for r in supabase_storage_api.requests]
    assert asked == [("GET", "/storage/v1/bucket/images")]


async def test_a_public_bucket_with_signed_urls_configured_refuses_to_start(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage
) -> None:
    # Signed URLs of a public bucket work, but the images are public anyway: say so rather than pretend.
    error, _logs = await start_error(supabase_settings(tmp_path, supabase_storage_api, storage_public=False))
    assert "GEN_STORAGE_PUBLIC" in str(error) and "public" in str(error)


async def test_a_missing_bucket_refuses_to_start(tmp_path: Path, supabase_storage_api: FakeSupabaseStorage) -> None:
    supabase_storage_api.buckets = {"other": True}
    error, _logs = await start_error(supabase_settings(tmp_path, supabase_storage_api))
    assert "GEN_STORAGE_BUCKET" in str(error) and "'images'" in str(error) and "not found" in str(error)


async def test_a_wrong_service_key_refuses_to_start(tmp_path: Path, supabase_storage_api: FakeSupabaseStorage) -> None:
    error, _logs = await start_error(
        supabase_settings(tmp_path, supabase_storage_api, supabase_service_key="not-the-key")
    )
    assert "GEN_SUPABASE_SERVICE_KEY" in str(error)


@pytest.mark.parametrize("public", [True, False])
async def test_matching_bucket_and_setting_start_and_serve(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage, public: bool
) -> None:
    supabase_storage_api.buckets = {"images": public}
    app = await start(supabase_settings(tmp_path, supabase_storage_api, storage_public=public))
    await app.stop()
    assert ("GET", "/storage/v1/bucket/images") in [(r.method, r.path) for r in supabase_storage_api.requests]
