"""Server interceptors: the shared-token check on the internal JobService -> generator hop."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

# Health checks and reflection stay open, so orchestrators and grpcurl work without the token.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# grpc.aio.ServerInterceptor.intercept_service is generic over the handler's request and response types.
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")


class SharedTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        method = handler_call_details.method or ""
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler)


def _refusing(
    handler: grpc.RpcMethodHandler[RequestT, ResponseT] | None,
) -> grpc.RpcMethodHandler[RequestT, ResponseT]:
    """A handler of the same streaming shape as `handler` that answers UNAUTHENTICATED.

    `handler` is None for a method this server does not have: a caller without the token is refused all
    the same (UNAUTHENTICATED, not UNIMPLEMENTED), so it learns nothing about the methods served here.
    """

    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")

    async def deny_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")
        yield  # pragma: no cover - makes this an async generator like the handler it replaces

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
