"""DeleteJobObjects against the real server: local storage and a fake Supabase Storage, errors, the token."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.config import GeneratorSettings
from tests.generator.fake_http import Reply
from tests.generator.fake_supabase import FakeSupabaseStorage, StoredObject, storage_error, storage_fault
from tests.generator.helpers import generate_request, running, settings_for
from tests.support.rpc_errors import failure_of

TOKEN = "internal-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def supabase_settings(tmp_path: Path, api: FakeSupabaseStorage, **overrides: Any) -> GeneratorSettings:
    return settings_for(
        tmp_path,
        storage_backend="supabase",
        supabase_url=api.url,
        supabase_service_key="test-service-key",
        auth_token=TOKEN,
        storage_max_retries=1,
        **overrides,
    )


async def stored_paths(stub: pb_grpc.GeneratorServiceAsyncStub, user: str, job: str, attempt: int) -> list[str]:
    """Runs one attempt of two images; the storage paths (and URLs) it reports."""
    request = generate_request(user_id=user, job_id=job, attempt=attempt)
    events = [e async for e in stub.Generate(request, metadata=AUTH)]
    return [e.image_stored.storage_path for e in events if e.HasField("image_stored")]


async def urls_of(stub: pb_grpc.GeneratorServiceAsyncStub, user: str, job: str, attempt: int) -> dict[str, str]:
    request = generate_request(user_id=user, job_id=job, attempt=attempt)
    events = [e async for e in stub.Generate(request, metadata=AUTH)]
    return {e.image_stored.storage_path: e.image_stored.url for e in events if e.HasField("image_stored")}


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("prefix", ["", "generated"])
async def test_local_storage_keeps_the_recorded_objects_and_deletes_the_rest_of_the_job(
    tmp_path: Path, prefix: str
) -> None:
    user, job, other_job = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    async with running(settings_for(tmp_path, auth_token=TOKEN, storage_prefix=prefix)) as (_app, stub):
        await stored_paths(stub, user, job, 1)  # an attempt that did not deliver
        recorded = await urls_of(stub, user, job, 2)
        untouched = await stored_paths(stub, user, other_job, 1)
        base = f"{prefix}/" if prefix else ""
        assert sorted(recorded) == [f"{base}{user}/{job}/2-0.png", f"{base}{user}/{job}/2-1.png"]

        reply = await stub.DeleteJobObjects(
            pb.DeleteJobObjectsRequest(user_id=user, job_id=job, keep_paths=list(recorded)), metadata=AUTH
        )

        assert sorted(reply.deleted_paths) == [f"{base}{user}/{job}/1-0.png", f"{base}{user}/{job}/1-1.png"]
        bucket = tmp_path / "storage" / "images"
        assert files_under(bucket) == sorted([*recorded, *untouched])
        async with httpx.AsyncClient() as http:
            for url in recorded.values():
                assert (await http.get(url)).status_code == 200
            gone = next(iter(recorded.values())).replace("/2-0.png", "/1-0.png")
            assert (await http.get(gone)).status_code == 404

        # Idempotent: nothing more to delete.
        again = await stub.DeleteJobObjects(
            pb.DeleteJobObjectsRequest(user_id=user, job_id=job, keep_paths=list(recorded)), metadata=AUTH
        )
        assert list(again.deleted_paths) == []

        # Nothing to keep: everything of the job goes, its folder too; the other job stays.
        everything = await stub.DeleteJobObjects(pb.DeleteJobObjectsRequest(user_id=user, job_id=job), metadata=AUTH)
        assert sorted(everything.deleted_paths) == sorted(recorded)
        assert files_under(bucket) == sorted(untouched)
        assert not (bucket / base / user / job).exists()


async def test_supabase_storage_lists_page_by_page_and_deletes_all_but_the_kept_objects(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage
) -> None:
    user, job = str(uuid.uuid4()), str(uuid.uuid4())
    for i in range(150):  # more than one page of the listing (100)
        supabase_storage_api.objects[("images", f"{user}/{job}/1-{i}.png")] = StoredObject(b"x", "image/png")
    supabase_storage_api.objects[("images", f"{user}/{job}-other/1-0.png")] = StoredObject(b"x", "image/png")
    async with running(supabase_settings(tmp_path, supabase_storage_api)) as (_app, stub):
        recorded = await urls_of(stub, user, job, 2)

        reply = await stub.DeleteJobObjects(
            pb.DeleteJobObjectsRequest(user_id=user, job_id=job, keep_paths=list(recorded)), metadata=AUTH
        )

    assert len(reply.deleted_paths) == 150
    assert sorted(key for _bucket, key in supabase_storage_api.objects) == sorted(
        [*recorded, f"{user}/{job}-other/1-0.png"]
    )
    lists = [r for r in supabase_storage_api.requests if r.path == "/storage/v1/object/list/images"]
    assert [r.json()["offset"] for r in lists[:2]] == [0, 100]
    assert {r.json()["prefix"] for r in lists} == {f"{user}/{job}"}
    deletes = [r for r in supabase_storage_api.requests if r.method == "DELETE"]
    assert deletes and all(r.path == "/storage/v1/object/images" for r in deletes)
    async with httpx.AsyncClient() as http:
        for url in recorded.values():
            assert (await http.get(url)).status_code == 200


async def test_supabase_storage_failures_are_reported_with_the_storage_reasons(
    tmp_path: Path, supabase_storage_api: FakeSupabaseStorage
) -> None:
    user, job = str(uuid.uuid4()), str(uuid.uuid4())
    supabase_storage_api.objects[("images", f"{user}/{job}/1-0.png")] = StoredObject(b"x", "image/png")
    request = pb.DeleteJobObjectsRequest(user_id=user, job_id=job)
    async with running(supabase_settings(tmp_path, supabase_storage_api)) as (_app, stub):
        # 500 on the listing, also on its retry: unavailable, worth trying again later.
        for _ in range(2):
            supabase_storage_api.list_faults.append(storage_fault(Reply(500, b"Internal Server Error")))
        unavailable = await failure_of(stub.DeleteJobObjects(request, metadata=AUTH))
        assert (unavailable.code, unavailable.reason) == ("UNAVAILABLE", "STORAGE_UNAVAILABLE")

        # A refused key on the deletion (the real server's 400 with statusCode "403").
        supabase_storage_api.delete_faults.append(
            storage_fault(storage_error("403", "Unauthorized", "signature verification failed", "AccessDenied"))
        )
        refused = await failure_of(stub.DeleteJobObjects(request, metadata=AUTH))
        assert (refused.code, refused.reason) == ("PERMISSION_DENIED", "STORAGE_PERMISSION_DENIED")
        assert ("images", f"{user}/{job}/1-0.png") in supabase_storage_api.objects

        # Storage back: the same call succeeds.
        reply = await stub.DeleteJobObjects(request, metadata=AUTH)
        assert list(reply.deleted_paths) == [f"{user}/{job}/1-0.png"]
        assert supabase_storage_api.objects == {}


@pytest.mark.parametrize(
    ("user_id", "job_id", "bad"),
    [
        ("user-1", str(uuid.uuid4()), "user_id"),
        ("..", str(uuid.uuid4()), "user_id"),
        (str(uuid.uuid4()), "../" + str(uuid.uuid4()), "job_id"),
        (str(uuid.uuid4()), str(uuid.uuid4()) + "/..", "job_id"),
        (str(uuid.uuid4()).upper(), str(uuid.uuid4()), "user_id"),
        ("", "", "user_id"),
    ],
)
async def test_ids_that_are_not_uuids_are_refused_and_nothing_is_deleted(
    tmp_path: Path, user_id: str, job_id: str, bad: str
) -> None:
    async with running(settings_for(tmp_path, auth_token=TOKEN)) as (_app, stub):
        victim = await stored_paths(stub, str(uuid.uuid4()), str(uuid.uuid4()), 1)
        failure = await failure_of(
            stub.DeleteJobObjects(pb.DeleteJobObjectsRequest(user_id=user_id, job_id=job_id), metadata=AUTH)
        )
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert bad in failure.violations
    assert files_under(tmp_path / "storage" / "images") == sorted(victim)


async def test_too_many_keep_paths_are_refused(tmp_path: Path) -> None:
    request = pb.DeleteJobObjectsRequest(
        user_id=str(uuid.uuid4()), job_id=str(uuid.uuid4()), keep_paths=[f"k{i}" for i in range(1001)]
    )
    async with running(settings_for(tmp_path, auth_token=TOKEN)) as (_app, stub):
        failure = await failure_of(stub.DeleteJobObjects(request, metadata=AUTH))
    assert (failure.code, failure.violations.keys()) == ("INVALID_ARGUMENT", {"keep_paths"})


async def test_without_the_token_it_is_unauthenticated_and_deletes_nothing(tmp_path: Path) -> None:
    user, job = str(uuid.uuid4()), str(uuid.uuid4())
    async with running(settings_for(tmp_path, auth_token=TOKEN)) as (_app, stub):
        paths = await stored_paths(stub, user, job, 1)
        for metadata in [(), (("authorization", "Bearer wrong"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DeleteJobObjects(pb.DeleteJobObjectsRequest(user_id=user, job_id=job), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert files_under(tmp_path / "storage" / "images") == sorted(paths)
