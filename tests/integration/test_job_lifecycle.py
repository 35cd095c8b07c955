"""The spine: CreateJob returns at once, the job runs in the background, WatchJob follows it to the end."""

from __future__ import annotations

import io
from pathlib import Path

import asyncpg
import httpx
from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from tests.support.ledger import assert_credits_consistent
from tests.support.services import new_user, running_services


async def test_job_runs_to_completion_and_watch_sees_every_state(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    user = new_user()
    async with running_services(database_url, tmp_path) as services, services.client(user) as client:
        job = await client.create_job("Robot holding skateboard", sample_count=4, aspect_ratio="16:9")
        assert job.state == pb.JOB_STATE_PENDING
        assert job.credits_reserved == 4

        updates = [update async for update in client.watch(job.id)]
        downloads = await _download([image.url for image in updates[-1].job.images])

    assert not updates[0].HasField("event"), "the first message is the snapshot"
    assert updates[0].job.state in (pb.JOB_STATE_PENDING, pb.JOB_STATE_GENERATING)
    events = [u.event for u in updates[1:]]
    seqs = [e.seq for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "every event after the snapshot, in order"
    types = [pb.JobEventType.Name(e.type) for e in events]
    assert types[-1] == "JOB_EVENT_TYPE_COMPLETED"
    assert types.count("JOB_EVENT_TYPE_IMAGE_STORED") == 4
    states = [updates[0].job.state] + [e.state for e in events]
    assert pb.JOB_STATE_GENERATING in states and states[-1] == pb.JOB_STATE_COMPLETED
    final = updates[-1].job
    assert final.state == pb.JOB_STATE_COMPLETED
    assert final.credits_charged == 4 and final.credits_reserved == 0
    assert sorted(image.index for image in final.images) == [0, 1, 2, 3]

    for image, response in zip(final.images, downloads, strict=True):
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        assert (picture.format, picture.size) == ("PNG", (1408, 768))
        assert len(response.content) == image.size_bytes

    stored = await db.fetch("SELECT seq, type, status FROM job_events WHERE job_id = $1 ORDER BY seq", final.id)
    assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))
    assert stored[0]["type"] == "created" and stored[-1]["status"] == "completed"
    balance = await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", user)
    assert balance == 100 - 4
    await assert_credits_consistent(db)


async def _download(urls: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient() as http:
        return [await http.get(url) for url in urls]


async def test_get_job_after_completion_and_list_newest_first(database_url: str, tmp_path: Path) -> None:
    async with running_services(database_url, tmp_path) as services, services.client() as client:
        first = await client.create_job("first", sample_count=1)
        second = await client.create_job("second", sample_count=1)
        done = await client.wait(second.id, timeout=120)
        await client.wait(first.id, timeout=120)
        fetched = await client.get_job(second.id)
        listing = await client.list_jobs()

    assert done.state == pb.JOB_STATE_COMPLETED
    assert fetched.id == second.id and fetched.state == pb.JOB_STATE_COMPLETED
    assert [j.id for j in listing.jobs] == [second.id, first.id]
