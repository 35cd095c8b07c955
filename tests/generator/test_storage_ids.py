"""Ids name storage folders: a caller cannot reach another user's folder with a crafted job or user id.

A real generator (local storage on disk) is called the way a caller would, over Generate and over
GenerateMany; the test then looks at the storage folder itself.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as pb

from generator_service.domain import job_folder
from imagegen_common.errors import ServiceError
from tests.generator.helpers import USER_ID, generate_request, job_uuid, running, settings_for
from tests.generator.test_generate_many import ended, error_of, many, the_error
from tests.support.rpc_errors import failure_of

VICTIM = "9d7c1b2a-3e4f-4a5b-8c6d-7e8f9a0b1c2d"
VICTIM_JOB = job_uuid("victim-job")

# (user_id, job_id, the field named in the BadRequest) that tried to land somewhere else.
CRAFTED = [
    pytest.param(USER_ID, f"../{VICTIM}/{VICTIM_JOB}", "job_id", id="job-id-climbs-to-the-victim"),
    pytest.param("..", f"{VICTIM}/{VICTIM_JOB}", "user_id", id="user-id-climbs"),
    pytest.param(USER_ID, VICTIM_JOB.upper(), "job_id", id="upper-case-uuid"),
    pytest.param(USER_ID, f"{{{VICTIM_JOB}}}", "job_id", id="braced-uuid"),
    pytest.param(USER_ID, "", "job_id", id="empty-job-id"),
    pytest.param(f"{USER_ID}/..", VICTIM_JOB, "user_id", id="user-id-with-a-slash"),
]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


async def store_the_victims_image(stub: object, bucket: Path) -> dict[str, bytes]:
    events = [e async for e in stub.Generate(generate_request(user_id=VICTIM, job_id=VICTIM_JOB, sample_count=1))]  # type: ignore[attr-defined]
    assert events[-1].completed.delivered_count == 1
    before = files_under(bucket)
    assert list(before) == [f"{VICTIM}/{VICTIM_JOB}/1-0.png"]
    return before


@pytest.mark.parametrize(("user_id", "job_id", "field"), CRAFTED)
async def test_generate_with_a_crafted_id_is_refused_and_writes_nothing(
    tmp_path: Path, user_id: str, job_id: str, field: str
) -> None:
    bucket = tmp_path / "storage" / "images"
    # The local renderer draws the prompt, so the attacker's image differs from the victim's.
    async with running(settings_for(tmp_path)) as (_app, stub):
        before = await store_the_victims_image(stub, bucket)
        request = generate_request(user_id=user_id, job_id=job_id, sample_count=1, prompt="overwritten")
        failure = await failure_of(_drain(stub.Generate(request)))

    assert failure.code == "INVALID_ARGUMENT"
    assert failure.reason == "INVALID_ARGUMENT"
    assert field in failure.violations and "UUID" in failure.violations[field]
    assert files_under(bucket) == before  # nothing written, the victim's image untouched
    assert files_under(tmp_path / "storage") == {f"images/{k}": v for k, v in before.items()}


@pytest.mark.parametrize(("user_id", "job_id", "field"), CRAFTED)
async def test_generate_many_with_a_crafted_id_is_refused_and_writes_nothing(
    tmp_path: Path, user_id: str, job_id: str, field: str
) -> None:
    bucket = tmp_path / "storage" / "images"
    async with running(settings_for(tmp_path)) as (_app, stub):
        before = await store_the_victims_image(stub, bucket)
        async with many(stub) as stream:
            stream.start(user_id=user_id, job_id=job_id, sample_count=1, prompt="overwritten")
            responses = await stream.read_until(ended((job_id, 1)))
            error = error_of(the_error(responses, (job_id, 1)))
            # The stream itself goes on: a valid attempt after the refused one is served.
            stream.start(job_id=job_uuid("after"), sample_count=1)
            await stream.read_until(ended((job_uuid("after"), 1)))

    assert (error.kind.name, error.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    violations = {v.field: v.description for v in error.violations}
    assert field in violations and "UUID" in violations[field]
    after = files_under(bucket)
    assert {k: v for k, v in after.items() if k.startswith(VICTIM)} == before
    assert sorted(k for k in after if not k.startswith(VICTIM)) == [f"{USER_ID}/{job_uuid('after')}/1-0.png"]


async def _drain(stream: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:  # type: ignore[type-arg]
    return [event async for event in stream]


def test_a_folder_is_built_only_from_uuids() -> None:
    assert job_folder(USER_ID, VICTIM_JOB) == f"{USER_ID}/{VICTIM_JOB}"
    with pytest.raises(ServiceError) as refused:
        job_folder(USER_ID, f"../{VICTIM}/{VICTIM_JOB}")
    assert [v.field for v in refused.value.violations] == ["job_id"]
