"""One root for the services' errors, mapped to a status in one place (imagegen_common.grpc_errors.service_error)."""

from __future__ import annotations

import asyncpg
import pytest

from imagegen_common.errors import DatabaseUnavailable, ErrorKind, ImagegenError, ServiceError
from imagegen_common.grpc_errors import rooted, service_error
from job_service.domain import GenerationFailure
from job_service.store import CONNECTION_ERRORS


def test_every_error_the_services_raise_on_purpose_has_one_root() -> None:
    assert issubclass(ServiceError, ImagegenError)
    assert issubclass(GenerationFailure, ImagegenError)
    assert issubclass(DatabaseUnavailable, ImagegenError)


def test_a_generation_failure_says_what_its_booleans_are() -> None:
    with pytest.raises(TypeError):
        GenerationFailure("PROVIDER_UNAVAILABLE", "503", True)  # type: ignore[misc]
    failure = GenerationFailure("PROVIDER_UNAVAILABLE", "503", retryable=True, counts=False)
    assert (failure.retryable, failure.counts, str(failure)) == (True, False, "PROVIDER_UNAVAILABLE: 503")


@pytest.mark.parametrize(
    "error",
    [asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), ConnectionRefusedError()],
)
def test_a_lost_database_connection_reaches_the_caller_as_unavailable(error: Exception) -> None:
    unavailable = rooted(error, CONNECTION_ERRORS)
    assert isinstance(unavailable, DatabaseUnavailable) and unavailable.__cause__ is error
    told = service_error(unavailable)
    assert (told.kind, told.reason) == (ErrorKind.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")


def test_anything_else_is_internal_with_a_stable_reason() -> None:
    for error in (GenerationFailure("STREAM_ENDED", "gone", retryable=True), KeyError("bug")):
        assert rooted(error, CONNECTION_ERRORS) is error
        told = service_error(error)
        assert (told.kind, told.reason, told.message) == (
            ErrorKind.INTERNAL,
            "INTERNAL",
            "internal error; see the server log",
        )
