"""JOB_INPUT_IMAGE_BUDGET_MB end to end: while other CreateJobs hold the budget with their inline images, one more
is refused with RESOURCE_EXHAUSTED, INPUT_IMAGE_BUDGET_EXHAUSTED and RetryInfo; once they are done, it runs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from imagegen.job.v1 import job_service_pb2 as pb
from PIL import Image

from imagegen_client.client import inline_image
from tests.integration.test_rate_limits_and_expiry import refused
from tests.support.services import running_services


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


async def test_a_create_past_the_input_image_budget_is_refused_with_retry_info_then_runs(
    database_url: str, tmp_path: Path
) -> None:
    job = {"max_in_flight": 0, "active_jobs_per_user": 100, "input_image_budget_mb": 1}
    async with running_services(database_url, tmp_path, job=job) as services, services.client() as client:
        budget = services.job.input_budget
        assert budget is not None
        image = png(64)
        storing = asyncio.Event()
        # Other calls' inline images, still being stored: 1 MB less 100 bytes of the budget held.
        others = asyncio.create_task(budget.run(1024 * 1024 - 100, storing.wait))
        await asyncio.sleep(0)
        try:
            failure, retry_after = await refused(
                client.create_job("edit", model="local", sample_count=1, input_images=[inline_image(image)])
            )
            # A job without inline images brings no bytes: it is not held up.
            plain = await client.create_job("no images", model="local", sample_count=1)
        finally:
            storing.set()
            await others
        created = await client.create_job("edit", model="local", sample_count=1, input_images=[inline_image(image)])

    assert failure.code == "RESOURCE_EXHAUSTED" and failure.reason == "INPUT_IMAGE_BUDGET_EXHAUSTED"
    assert f"brings {len(image)}" in failure.message and "retry in 1 s" in failure.message
    assert failure.metadata["budget_bytes"] == str(1024 * 1024)
    assert retry_after == 1.0
    assert plain.state == pb.JOB_STATE_PENDING
    assert (created.state, len(created.input_images)) == (pb.JOB_STATE_PENDING, 1)
    assert budget.held_bytes == 0
