"""Job and event times on the wire: the same instant protobuf's own FromDatetime gives, for every kind of datetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import timestamp_pb2

from job_service.domain import JobEvent, JobEventType, JobState
from job_service.servicer import event_to_pb

INSTANTS = [
    datetime(2026, 11, 30, 19, 30, 17, 337764, tzinfo=UTC),
    datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2026, 11, 30, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=-8))),
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch: negative seconds
    datetime(2026, 11, 30, 12, 0, 0, 500000),  # naive: UTC
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("at", INSTANTS, ids=str)
def test_an_event_time_is_the_instant_protobuf_would_give(at: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(at)
    message = event_to_pb(JobEvent("j", 1, JobEventType.CREATED, JobState.PENDING, 0, at))
    assert (message.time.seconds, message.time.nanos) == (expected.seconds, expected.nanos)
    aware = at if at.tzinfo else at.replace(tzinfo=UTC)
    assert message.time.ToDatetime(tzinfo=UTC) == aware
