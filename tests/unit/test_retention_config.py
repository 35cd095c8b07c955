"""When retention deletes what: images at the shorter of the two periods (a job's row never goes before its objects)."""

from __future__ import annotations

import pytest

from job_service.retention import RetentionConfig


def config(images: float, jobs: float) -> RetentionConfig:
    return RetentionConfig(image_retention_days=images, job_retention_days=jobs, interval_seconds=60, batch_size=10)


@pytest.mark.parametrize(
    ("images", "jobs", "images_after", "jobs_after"),
    [
        (0, 0, None, None),  # the default: nothing is ever deleted by retention
        (7, 0, 7 * 86_400, None),  # images go, jobs stay for ever
        (7, 30, 7 * 86_400, 30 * 86_400),
        (30, 7, 7 * 86_400, 7 * 86_400),  # the job goes first: its images must go with it
        (0, 7, 7 * 86_400, 7 * 86_400),  # images "for ever", but not longer than their job
        (0.5, 0, 43_200, None),  # fractions of a day
    ],
)
def test_images_go_at_the_shorter_retention_and_zero_keeps_for_ever(
    images: float, jobs: float, images_after: float | None, jobs_after: float | None
) -> None:
    assert config(images, jobs).images_after_seconds == images_after
    assert config(images, jobs).jobs_after_seconds == jobs_after
