"""Request bodies that do not parse become an INVALID_ARGUMENT the handler raises, after it has checked the token.

grpc-python decodes a request before any handler or interceptor code runs, and a decoder error there is logged
with its traceback and answered UNKNOWN with the decoder's own text, to anyone, token or not. The servers
install `tolerant` deserializers instead (see rpc_observability.ServerObservability): a body that does not
parse arrives as an `Undecodable`, and the handler turns it into INVALID_ARGUMENT with `decoded` once the
caller is known to be allowed in, so an unauthenticated caller still sees UNAUTHENTICATED first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from imagegen_common.errors import ErrorKind, ServiceError

T = TypeVar("T")
REASON = "UNDECODABLE_REQUEST"


class Undecodable:
    """Stands in for a request body that did not parse. Keeps nothing of the body (it may be 4 MiB)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"Undecodable({self.size} bytes)"


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an Undecodable instead of raising on a body that does not parse."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(body: bytes) -> Any:
        try:
            return parse(body)
        except Exception:  # DecodeError, or any other way of not being a message: the caller's body, not our fault
            return Undecodable(len(body))

    return deserialize


def undecodable_error() -> ServiceError:
    # Says nothing of where or why parsing failed: that is the decoder's internals.
    return ServiceError(
        ErrorKind.INVALID_ARGUMENT, REASON, "the request body is not a valid message of this method's request type"
    )


def decoded(request: T | Undecodable) -> T:
    """The request, or INVALID_ARGUMENT (UNDECODABLE_REQUEST) when its body did not parse."""
    if isinstance(request, Undecodable):
        raise undecodable_error()
    return request
