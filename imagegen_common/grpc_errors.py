"""The one place where the services' errors (ImagegenError) become gRPC statuses (google.rpc.Status with ErrorInfo
and details)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagegen_common.bounds import clip
from imagegen_common.errors import DatabaseUnavailable, ErrorKind, FieldViolation, ServiceError

log = structlog.get_logger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
DatabaseErrors = tuple[type[BaseException], ...]


# What a status may hold. Its message travels as grpc-message and its details as grpc-status-details-bin
# (base64) in the trailers, which a default client accepts up to 8 KiB in all: an error that echoes what the
# caller sent (50 unknown template variables, one 5 kB variable name) must stay well inside that, or the
# caller sees RESOURCE_EXHAUSTED instead of the error. With these, a status takes at most about 6 KiB (a
# message of non-ASCII text triples when percent-encoded; the details grow by a third in base64).
MAX_MESSAGE_BYTES = 600
MAX_VIOLATIONS = 10
MAX_FIELD_BYTES = 100
MAX_DESCRIPTION_BYTES = 160
MAX_METADATA_VALUE_BYTES = 200


def bounded_violations(violations: list[FieldViolation]) -> list[FieldViolation]:
    """At most MAX_VIOLATIONS, each clipped; when some are left out, a last one says how many."""
    shown = [
        FieldViolation(clip(v.field, MAX_FIELD_BYTES), clip(v.description, MAX_DESCRIPTION_BYTES))
        for v in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        # An empty field is the request as a whole (google.rpc.BadRequest).
        shown.append(FieldViolation("", f"{len(violations) - MAX_VIOLATIONS} more field violations not shown"))
    return shown


def to_status_proto(err: ServiceError, domain: str) -> status_pb2.Status:
    """The google.rpc.Status of an error: its ErrorInfo, and a BadRequest and RetryInfo when it has them.

    Everything in it is bounded (see MAX_MESSAGE_BYTES): messages and violations may quote the caller.
    """
    metadata = {key: clip(value, MAX_METADATA_VALUE_BYTES) for key, value in err.metadata.items()}
    packed: list[Any] = [error_details_pb2.ErrorInfo(reason=err.reason, domain=domain, metadata=metadata)]
    if err.violations:
        packed.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in bounded_violations(err.violations)
                ]
            )
        )
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after * 1e9))
        packed.append(error_details_pb2.RetryInfo(retry_delay=delay))
    anys = []
    for message in packed:
        wrapped = any_pb2.Any()
        wrapped.Pack(message)
        anys.append(wrapped)
    message = clip(err.message, MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=getattr(code_pb2, err.kind.value), message=message, details=anys)


def to_grpc_status(err: ServiceError, domain: str) -> grpc.Status:
    result: grpc.Status = rpc_status.to_status(to_status_proto(err, domain))
    return result


def from_grpc_error(error: grpc.aio.AioRpcError, default_reason: str = "UNKNOWN") -> ServiceError:
    """Reads a peer's rich status back into a ServiceError (ErrorInfo, BadRequest and RetryInfo kept)."""
    status = status_pb2.Status(message=error.details() or "")
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            status.message = error.details() or ""
    return from_status_proto(error.code().name, status, default_reason)


def from_status_proto(code: str, status: status_pb2.Status, default_reason: str = "UNKNOWN") -> ServiceError:
    """A ServiceError from a status code's name and a google.rpc.Status (ErrorInfo, BadRequest, RetryInfo)."""
    kind = ErrorKind(code) if code in ErrorKind.__members__ else ErrorKind.INTERNAL
    reason, metadata, violations, retry_after = default_reason, {}, [], None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return ServiceError(kind, reason, status.message, violations, metadata, retry_after)


def service_error(exc: BaseException) -> ServiceError:
    """What a handler's exception tells its caller: a ServiceError as it is; DatabaseUnavailable as UNAVAILABLE,
    which tells clients to retry; anything else (a GenerationFailure that got this far, a bug) as INTERNAL with a
    stable reason, logged."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, DatabaseUnavailable):
        log.warning("dependency unavailable", error=str(exc))
        return ServiceError(ErrorKind.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE", "a dependency is unavailable; retry")
    # Never a traceback to the caller: log it here, answer INTERNAL with a stable reason.
    log.exception("unhandled error in RPC handler", exc_info=exc)
    return ServiceError(ErrorKind.INTERNAL, "INTERNAL", "internal error; see the server log")


def rooted(exc: Exception, database_errors: DatabaseErrors) -> Exception:
    """`exc`, or the DatabaseUnavailable it stands for when it is one of the database driver's connection errors
    (which reach the handler as they are), with `exc` as its cause."""
    if not database_errors or not isinstance(exc, database_errors):
        return exc
    unavailable = DatabaseUnavailable(str(exc) or type(exc).__name__)
    unavailable.__cause__ = exc
    return unavailable


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, domain: str, database_errors: DatabaseErrors
) -> None:
    status = to_grpc_status(service_error(rooted(exc, database_errors)), domain)
    await context.abort(status.code, status.details, status.trailing_metadata)


def unary_errors(
    domain: str,
    database_errors: DatabaseErrors = (),
) -> Callable[[Callable[[Any, Req, Any], Awaitable[Resp]]], Callable[[Any, Req, Any], Awaitable[Resp]]]:
    """Decorates a unary servicer method so every error it raises becomes a rich status (see service_error).

    Exceptions of the `database_errors` types (the driver's connection errors) are DatabaseUnavailable.
    """

    def decorate(
        method: Callable[[Any, Req, Any], Awaitable[Resp]],
    ) -> Callable[[Any, Req, Any], Awaitable[Resp]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Req, context: Any) -> Resp:
            try:
                return await method(self, request, context)
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, domain, database_errors)
                raise  # unreachable: abort raises

        return wrapper

    return decorate


def stream_errors(
    domain: str,
    database_errors: DatabaseErrors = (),
) -> Callable[[Callable[[Any, Req, Any], AsyncIterator[Resp]]], Callable[[Any, Req, Any], AsyncIterator[Resp]]]:
    """Decorates a server-streaming servicer method the same way as `unary_errors`."""

    def decorate(
        method: Callable[[Any, Req, Any], AsyncIterator[Resp]],
    ) -> Callable[[Any, Req, Any], AsyncIterator[Resp]]:
        @functools.wraps(method)
        async def wrapper(self: Any, request: Req, context: Any) -> AsyncIterator[Resp]:
            try:
                # aclosing: if the stream is closed between items, the handler's own cleanup runs now, not at GC.
                async with contextlib.aclosing(method(self, request, context)) as items:  # type: ignore[type-var]
                    async for item in items:
                        yield item
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc, domain, database_errors)

        return wrapper

    return decorate
