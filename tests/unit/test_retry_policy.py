"""The dispatcher's retry policy: backoff with jitter, Retry-After as a floor, retry or fail."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from job_service.dispatcher import after_failure, retry_delay
from job_service.domain import GenerationFailure, Job
from tests.support.jobs import a_job


def make_job(*, attempt: int, failed_attempts: int, max_attempts: int = 5) -> Job:
    return a_job(attempt=attempt, failed_attempts=failed_attempts, max_attempts=max_attempts)


RETRYABLE = GenerationFailure("PROVIDER_UNAVAILABLE", "503 from the provider", retryable=True)
PERMANENT = GenerationFailure("PROMPT_BLOCKED", "the prompt was blocked", retryable=False)
UNREACHABLE = GenerationFailure("GENERATOR_UNAVAILABLE", "connection refused", retryable=True, counts=False)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8, 20])
def test_retry_delay_grows_exponentially_within_jittered_bounds_and_the_cap(attempt: int) -> None:
    base, cap = 2.0, 60.0
    ceiling = min(cap, base * 2 ** (attempt - 1))
    delays = [retry_delay(attempt, base, cap, None) for _ in range(500)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len({round(d, 6) for d in delays}) > 100, "jittered, not one fixed value"


def test_retry_delay_means_double_per_attempt_until_the_cap() -> None:
    means = [sum(retry_delay(a, 1.0, 16.0, None) for _ in range(2000)) / 2000 for a in range(1, 8)]
    for earlier, later in itertools.pairwise(means[:5]):
        assert later == pytest.approx(2 * earlier, rel=0.1)
    assert means[5] == pytest.approx(means[6], rel=0.1), "capped"


def test_retry_after_from_the_provider_is_a_floor_not_a_ceiling() -> None:
    assert all(retry_delay(1, 0.5, 10.0, 7.5) == 7.5 for _ in range(100))
    # A Retry-After shorter than the backoff changes nothing.
    assert all(8.0 <= retry_delay(5, 1.0, 16.0, 0.1) <= 16.0 for _ in range(100))


def test_retryable_failure_is_retried_and_counted() -> None:
    decision = after_failure(make_job(attempt=1, failed_attempts=0), RETRYABLE, 0.2, 1.0)
    assert decision.retry and decision.count_failure
    assert decision.delay is not None and 0.1 <= decision.delay <= 0.2


def test_retryable_failure_fails_once_max_attempts_are_used_up() -> None:
    assert after_failure(make_job(attempt=4, failed_attempts=3), RETRYABLE, 0.2, 1.0).retry
    last = after_failure(make_job(attempt=5, failed_attempts=4), RETRYABLE, 0.2, 1.0)
    assert not last.retry and last.delay is None and last.count_failure


def test_permanent_failure_fails_at_once() -> None:
    decision = after_failure(make_job(attempt=1, failed_attempts=0), PERMANENT, 0.2, 1.0)
    assert not decision.retry


def test_unreachable_generator_never_uses_up_attempts() -> None:
    job = make_job(attempt=50, failed_attempts=4, max_attempts=5)
    decision = after_failure(job, UNREACHABLE, 0.2, 1.0)
    assert decision.retry and not decision.count_failure
    assert decision.delay is not None and 0.5 <= decision.delay <= 1.0, "backoff capped, not unbounded"


def test_retry_after_reaches_the_decision() -> None:
    throttled = dataclasses.replace(RETRYABLE, reason="RESOURCE_EXHAUSTED", retry_after=3.0)
    decision = after_failure(make_job(attempt=1, failed_attempts=0), throttled, 0.2, 1.0)
    assert decision.delay == 3.0
