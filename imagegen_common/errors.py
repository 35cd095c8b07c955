"""Errors that domain code raises; the servicer layer turns them into rich gRPC statuses.

Every error the services raise on purpose is an ImagegenError: a ServiceError (what a caller should see), a
DatabaseUnavailable (the database is away: retry), or JobService's GenerationFailure (an attempt that did not
complete). Domain and store modules import nothing from grpc, so they say *what kind* of failure it is
(`ErrorKind`, named after the gRPC code it becomes) and *why* (an UPPER_SNAKE reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ImagegenError(Exception):
    """The root of the services' own errors; imagegen_common.grpc_errors.service_error maps it to a status."""


class DatabaseUnavailable(ImagegenError):
    """The database could not be reached, or a connection to it broke: a retry later may succeed."""


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class ServiceError(ImagegenError):
    """A failure the caller should see, with a stable reason."""

    kind: ErrorKind
    reason: str
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    # Seconds the caller should wait before retrying, when known (becomes google.rpc.RetryInfo).
    retry_after: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.kind} {self.reason}: {self.message}"


_SUMMARISED = 3


def invalid_argument(violations: list[FieldViolation], reason: str = "INVALID_ARGUMENT") -> ServiceError:
    """One error carrying every bad field, so a caller fixes them all in one go."""
    # The first few in the message; the BadRequest detail has them all (as many as a status can carry).
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:_SUMMARISED])
    if len(violations) > _SUMMARISED:
        summary += f"; and {len(violations) - _SUMMARISED} more (see the BadRequest detail)"
    return ServiceError(ErrorKind.INVALID_ARGUMENT, reason, f"invalid request: {summary}", violations)
