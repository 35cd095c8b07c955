"""SupabaseStorage (storage3's async client) against a fake Supabase Storage REST server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from generator_service.retry import RetryPolicy
from generator_service.storage.base import UploadedObject
from generator_service.storage.supabase import SupabaseStorage
from imagegen_common.errors import ErrorKind, ServiceError
from tests.generator.fake_google import image_bytes
from tests.generator.fake_http import Reply
from tests.generator.fake_supabase import FakeSupabaseStorage, StoredObject, storage_error, storage_fault
from tests.generator.helpers import JOB_ID, USER_ID

PNG = image_bytes(1024, 1024, "image/png")
PATH = f"{USER_ID}/{JOB_ID}/1-0.png"


def storage(api: FakeSupabaseStorage, *, key: str = "test-service-key", **options: Any) -> SupabaseStorage:
    return SupabaseStorage.create(
        api.url,
        key,
        "images",
        policy=RetryPolicy(
            max_retries=3, max_total_seconds=5.0, backoff_initial_seconds=0.01, backoff_max_seconds=0.05
        ),
        timeout_seconds=5.0,
        **options,
    )


async def upload(api: FakeSupabaseStorage, **options: Any) -> UploadedObject:
    store = storage(api, **options)
    try:
        return await store.upload(PATH, PNG, "image/png")
    finally:
        await store.aclose()


async def upload_error(api: FakeSupabaseStorage, **options: Any) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await upload(api, **options)
    return caught.value


async def test_upload_sends_an_upsert_with_the_content_type_and_returns_the_public_url(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    url = (await upload(supabase_storage_api)).url

    sent = supabase_storage_api.requests[0]
    assert (sent.method, sent.path) == ("POST", f"/storage/v1/object/images/{PATH}")
    assert sent.headers["x-upsert"] == "true"
    assert sent.headers["authorization"] == "Bearer test-service-key"
    assert sent.headers["apikey"] == "test-service-key"
    assert supabase_storage_api.objects[("images", PATH)] == StoredObject(PNG, "image/png")
    assert url == f"{supabase_storage_api.url}/storage/v1/object/public/images/{PATH}"
    async with httpx.AsyncClient() as client:
        fetched = await client.get(url)
    assert (fetched.status_code, fetched.content, fetched.headers["content-type"]) == (200, PNG, "image/png")


async def test_uploading_the_same_path_again_overwrites_it(supabase_storage_api: FakeSupabaseStorage) -> None:
    supabase_storage_api.objects[("images", PATH)] = StoredObject(b"an older attempt", "image/png")
    await upload(supabase_storage_api)
    assert supabase_storage_api.objects[("images", PATH)].data == PNG


async def test_the_prefix_setting_puts_objects_under_a_folder(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    uploaded = await upload(supabase_storage_api, prefix="/generated/")
    assert ("images", f"generated/{PATH}") in supabase_storage_api.objects
    assert uploaded.url.endswith(f"/storage/v1/object/public/images/generated/{PATH}")
    assert uploaded.key == f"generated/{PATH}"  # the object's real key, prefix included


async def test_a_private_bucket_gets_a_signed_url_with_the_configured_ttl(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    supabase_storage_api.buckets["images"] = False
    uploaded = await upload(supabase_storage_api, public=False, signed_url_ttl_seconds=600)
    url = uploaded.url
    assert uploaded.key == PATH

    assert [int(str(r["expiresIn"])) for r in supabase_storage_api.sign_requests] == [600]
    assert url.startswith(f"{supabase_storage_api.url}/storage/v1/object/sign/images/{PATH}?token=")
    async with httpx.AsyncClient() as client:
        signed = await client.get(url)
        public = await client.get(f"{supabase_storage_api.url}/storage/v1/object/public/images/{PATH}")
    assert (signed.status_code, signed.content) == (200, PNG)
    assert public.status_code == 400  # a private bucket has no public URLs


@pytest.mark.parametrize(
    "fault",
    [
        Reply(500, b"Internal Server Error", {"content-type": "text/plain"}),
        Reply(503, b"<html>Service Unavailable</html>", {"content-type": "text/html"}),
        storage_error("500", "Internal", "Internal Server Error", "InternalError"),  # HTTP 400, statusCode "500"
    ],
    ids=["http-500", "http-503", "statusCode-500-in-a-400"],
)
async def test_storage_server_errors_are_retried_then_succeed(
    supabase_storage_api: FakeSupabaseStorage, fault: Reply
) -> None:
    supabase_storage_api.upload_faults.append(storage_fault(fault))
    url = (await upload(supabase_storage_api)).url

    uploads = [r for r in supabase_storage_api.requests if r.method == "POST"]
    assert len(uploads) == 2
    assert supabase_storage_api.objects[("images", PATH)].data == PNG
    assert url.endswith(PATH)


async def test_storage_that_stays_down_fails_retryable(supabase_storage_api: FakeSupabaseStorage) -> None:
    supabase_storage_api.upload_faults.extend(storage_fault(Reply(503, b"unavailable")) for _ in range(10))
    error = await upload_error(supabase_storage_api)
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
        "true",
    )
    assert len(supabase_storage_api.requests) == 4  # the first try and three retries


async def test_already_exists_despite_upsert_is_a_permanent_conflict(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    supabase_storage_api.ignore_upsert = True  # e.g. a proxy that strips x-upsert
    supabase_storage_api.objects[("images", PATH)] = StoredObject(b"an older attempt", "image/png")
    error = await upload_error(supabase_storage_api)

    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.ALREADY_EXISTS,
        "STORAGE_CONFLICT",
        "false",
    )
    assert "The resource already exists" in error.message
    assert len(supabase_storage_api.requests) == 1
    assert supabase_storage_api.objects[("images", PATH)].data == b"an older attempt"


async def test_a_wrong_service_key_is_a_permanent_permission_error(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    error = await upload_error(supabase_storage_api, key="not-the-key")
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.PERMISSION_DENIED,
        "STORAGE_PERMISSION_DENIED",
        "false",
    )
    assert len(supabase_storage_api.requests) == 1


async def test_a_missing_bucket_is_a_permanent_error(supabase_storage_api: FakeSupabaseStorage) -> None:
    supabase_storage_api.buckets = {"other": True}
    error = await upload_error(supabase_storage_api)
    assert (error.reason, error.metadata["retryable"]) == ("STORAGE_BUCKET_NOT_FOUND", "false")


async def test_unreachable_storage_is_retryable(supabase_storage_api: FakeSupabaseStorage) -> None:
    await supabase_storage_api.stop()
    error = await upload_error(supabase_storage_api)
    assert (error.reason, error.metadata["retryable"]) == ("STORAGE_UNAVAILABLE", "true")


async def test_an_input_image_is_read_back_by_its_key_with_the_service_key(
    supabase_storage_api: FakeSupabaseStorage,
) -> None:
    client = storage(supabase_storage_api, prefix="generated")
    png = image_bytes(32, 32, "image/png")
    folder = f"{uuid.uuid4()}/{uuid.uuid4()}"
    uploaded = await client.upload(f"{folder}/1-0.png", png, "image/png")
    assert await client.read(uploaded.key) == png
    with pytest.raises(ServiceError) as caught:
        await client.read(f"generated/{folder}/9-9.png")
    await client.aclose()
    assert (caught.value.reason, caught.value.metadata["retryable"]) == ("INPUT_IMAGE_NOT_FOUND", "false")
