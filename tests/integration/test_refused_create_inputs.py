"""A refused CreateJob leaves none of its inline input images behind, but never deletes one that another create of
the same user is using (job_service/input_holds.py)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from imagegen_client.client import ImageGenClient, inline_image
from job_service.store import JobStore
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, new_user, running_services


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    # No job ever starts, and one pending job is the most a user may have: the second create is refused.
    job = {"max_in_flight": 0, "active_jobs_per_user": 1}
    async with running_services(database_url, tmp_path, job=job) as s:
        yield s


async def stored(services: Services, user: str) -> dict[str, int]:
    """The user's stored input images: sha256 -> holds."""
    rows = await services.job.pool.fetch("SELECT sha256, holds FROM job_input_blobs WHERE user_id = $1", user)
    return {row["sha256"]: row["holds"] for row in rows}


async def refused_edit(client: ImageGenClient, image: bytes) -> str:
    failure = await failure_of(
        client.create_job("edit", model="local", sample_count=1, input_images=[inline_image(image)])
    )
    return failure.reason


async def test_a_refused_create_deletes_the_images_it_stored_and_a_created_job_keeps_its_own(
    services: Services,
) -> None:
    user = new_user()
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    async with services.client(user) as client:
        kept = await client.create_job("first", model="local", sample_count=1, input_images=[inline_image(red)])
        assert kept.state == pb.JOB_STATE_PENDING
        reason = await refused_edit(client, blue)
        # The same image as the job that exists: named by it, so kept.
        reason_again = await refused_edit(client, red)

    assert (reason, reason_again) == ("TOO_MANY_ACTIVE_JOBS", "TOO_MANY_ACTIVE_JOBS")
    assert await stored(services, user) == {hashlib.sha256(red).hexdigest(): 0}


async def test_a_refused_create_keeps_an_image_another_create_in_progress_holds(services: Services) -> None:
    user = new_user()
    image = png((0, 160, 0))
    digest = hashlib.sha256(image).hexdigest()
    store = JobStore(services.job.pool)
    async with services.client(user) as client:
        await client.create_job("fills the user's one active slot", model="local", sample_count=1)
        # Another create of the same user with the same image, on any replica: it has stored the bytes and not yet
        # inserted its job (its job would not find them if they went now).
        await store.put_input_blobs(user, [(digest, "image/png", image)])

        assert await refused_edit(client, image) == "TOO_MANY_ACTIVE_JOBS"
        assert await stored(services, user) == {digest: 1}, "still held by the other create"

        # The other create ends without a job (refused as well): nothing holds or names it any more.
        assert await store.release_input_blobs(user, [digest]) == 1
    assert await stored(services, user) == {}
