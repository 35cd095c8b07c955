"""What a caller reads from a failed JobService call: code, and the google.rpc.Status details."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

JOB_DOMAIN = "imagegen.job.v1"


@dataclass
class RpcFailure:
    code: str  # e.g. "INVALID_ARGUMENT"
    message: str
    reasons: list[str] = field(default_factory=list)  # one per ErrorInfo in the status
    domains: list[str] = field(default_factory=list)
    violations: dict[str, str] = field(default_factory=dict)  # field -> description
    metadata: dict[str, str] = field(default_factory=dict)  # the ErrorInfo's

    @property
    def reason(self) -> str:
        assert len(self.reasons) == 1, f"expected exactly one ErrorInfo, got {self.reasons}"
        return self.reasons[0]


def read_failure(error: grpc.aio.AioRpcError) -> RpcFailure:
    failure = RpcFailure(error.code().name, error.details() or "")
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        assert status.code == error.code().value[0], "the rich status agrees with the gRPC code"
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                failure.reasons.append(info.reason)
                failure.domains.append(info.domain)
                failure.metadata.update(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                failure.violations.update({v.field: v.description for v in bad.field_violations})
    return failure


async def failure_of(call: Awaitable[Any] | Any) -> RpcFailure:
    """Awaits a call that must fail; returns what the caller sees."""
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        return read_failure(error)
    raise AssertionError(f"the call succeeded: {result}")
