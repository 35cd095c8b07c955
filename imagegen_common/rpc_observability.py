"""One log line and one histogram observation per RPC, and W3C trace context across the two services.

`ServerObservability` is the outermost server interceptor of both services. For every call it binds a log
context (request_id, trace_id, span_id, and job_id / user_id / attempt when the request carries them) that
every log line written while handling the call inherits, then records method, status code, duration and
peer. `OutgoingCalls` sends a `traceparent` with each call JobService makes to the
generator: the current trace when there is one (a CreateJob that looks up models), otherwise a new trace
for each call; each attempt carried on a GenerateMany stream counts as a call of its own (`carried`), so each
job attempt is one trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import structlog

from imagegen_common.bounds import bounded
from imagegen_common.decoding import Undecodable, tolerant, undecodable_error
from imagegen_common.metrics import RpcMetrics

log = structlog.get_logger("imagegen.rpc")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

TRACEPARENT = "traceparent"
REQUEST_ID = "x-request-id"
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# Answers to these are expected to be frequent and boring (orchestrators probe health every few seconds).
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Methods open to every caller (no token): a body of theirs that does not parse is refused by this interceptor.
_OPEN_PREFIXES = _QUIET_PREFIXES
# Codes that mean "the server has a problem" rather than "the caller asked for something it cannot have".
_SERVER_FAULTS = {"UNKNOWN", "INTERNAL", "DATA_LOSS", "UNIMPLEMENTED"}


def new_span_id() -> str:
    return secrets.token_hex(8)


def new_trace_id() -> str:
    return secrets.token_hex(16)


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace_id, parent span id, flags) of a valid version-00 traceparent, else None."""
    match = _TRACEPARENT_RE.match((value or "").strip().lower())
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1), match.group(2), match.group(3)


def format_traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _code_name(code: object, default: str) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return default


def _request_fields(request: object, trust_user_id: bool) -> dict[str, Any]:
    # Bounded: the caller chose these, and every line of the call carries them (a 1 MiB job_id was 1 MiB a line).
    fields: dict[str, Any] = {}
    for name in ("job_id", "attempt", *(("user_id",) if trust_user_id else ())):
        value = getattr(request, name, None)
        if value:
            fields[name] = bounded(value)
    return fields


def _response_fields(response: object) -> dict[str, Any]:
    """job_id / user_id from an answer that holds a job: known to be right, unlike a request's claim."""
    job: Any = getattr(response, "job", None)
    job_id: object = getattr(job, "id", None)
    if isinstance(job_id, str) and job_id:
        return {"job_id": job_id, "user_id": job.user_id}
    user_id = getattr(response, "user_id", "")
    return {"user_id": user_id} if isinstance(user_id, str) and user_id else {}


@dataclass
class CarriedCall:
    """The outcome of a call carried inside a stream; its handler sets `code` when it answers an error."""

    code: str = "OK"


class ServerObservability(grpc.aio.ServerInterceptor):
    """Metrics, a log line and a bound log context for every unary and server-streaming RPC.

    `trust_request_user_id`: log the request's user_id field as the user (the generator, whose only caller
    is JobService). JobService leaves it off: its callers' user_id field is a request, not a fact, so the
    user is taken from the answer instead.
    """

    def __init__(
        self, metrics: RpcMetrics, *, trust_request_user_id: bool = False, services: Collection[str] | None = None
    ) -> None:
        self._metrics = metrics
        self._trust_user_id = trust_request_user_id
        # The services this server has (None: whatever reaches this interceptor). A method of any other one
        # still reaches it when an inner interceptor answers every call (the generator's token check refuses
        # unknown methods too): its name is the caller's choice, so it is measured as "unknown" instead of
        # adding a metric series per name made up.
        self._services = frozenset(services) if services is not None else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[RequestT, ResponseT] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[RequestT, ResponseT] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method
        full_method = handler_call_details.method or ""
        # A body that does not parse reaches the handler as an Undecodable (see imagegen_common.decoding): our
        # services reject it once the caller is authenticated; the open ones (health, reflection) right here.
        deserializer = tolerant(handler.request_deserializer)
        open_method = full_method.startswith(_OPEN_PREFIXES)
        if handler.request_streaming:
            # Not observed (reflection's stream; GenerateMany, whose attempts are observed one by one instead).
            if not handler.response_streaming:
                return handler
            stream = cast(Any, handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(
                _checking_each_request(stream) if open_method else stream, deserializer, handler.response_serializer
            )
        metadata: Mapping[str, Any] = dict(handler_call_details.invocation_metadata or ())
        if handler.response_streaming:
            stream = cast(Any, handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(_checking_stream(stream) if open_method else stream, full_method, metadata),
                deserializer,
                handler.response_serializer,
            )
        unary = cast(Any, handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(_checking_unary(unary) if open_method else unary, full_method, metadata),
            deserializer,
            handler.response_serializer,
        )

    def _context_fields(self, request: object, metadata: Mapping[str, Any]) -> dict[str, Any]:
        incoming = parse_traceparent(metadata.get(TRACEPARENT))
        trace_id, parent = (incoming[0], incoming[1]) if incoming else (new_trace_id(), None)
        request_id = metadata.get(REQUEST_ID) or getattr(request, "request_id", None) or uuid.uuid4().hex[:16]
        fields: dict[str, Any] = {"request_id": str(request_id)[:64], "trace_id": trace_id, "span_id": new_span_id()}
        if parent:
            fields["parent_span_id"] = parent
        fields.update(_request_fields(request, self._trust_user_id))
        return fields

    def _unary(
        self, inner: Callable[[Any, Any], Awaitable[Any]], full_method: str, metadata: Mapping[str, Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._started(full_method)
            peer = peer_of(context)
            code, extra = "UNKNOWN", cast(dict[str, Any], {})
            with structlog.contextvars.bound_contextvars(**self._context_fields(request, metadata)):
                try:
                    response = await inner(request, context)
                    code, extra = _code_name(context.code(), "OK"), _response_fields(response)
                    return response
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code_name(context.code(), "UNKNOWN")
                    if code == "OK":  # raised without aborting: the caller sees UNKNOWN
                        code = "UNKNOWN"
                    raise
                finally:
                    self._finished(full_method, "unary", started, code, peer, extra)

        return behavior

    def _streaming(
        self, inner: Callable[[Any, Any], AsyncIterator[Any]], full_method: str, metadata: Mapping[str, Any]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = self._started(full_method)
            peer = peer_of(context)
            code, extra = "UNKNOWN", cast(dict[str, Any], {})
            with structlog.contextvars.bound_contextvars(**self._context_fields(request, metadata)):
                try:
                    async for response in inner(request, context):
                        if not extra:
                            extra = _response_fields(response)
                        yield response
                    code = _code_name(context.code(), "OK")
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                except BaseException:
                    code = _code_name(context.code(), "UNKNOWN")
                    if code == "OK":
                        code = "UNKNOWN"
                    raise
                finally:
                    self._finished(full_method, "server_stream", started, code, peer, extra)

        return behavior

    @contextlib.contextmanager
    def carried(self, full_method: str, request: object, traceparent: str, peer: str) -> Iterator[CarriedCall]:
        """Observes a call carried inside a stream (an attempt on GenerateMany) as its own RPC would be.

        The same bound log context (continuing `traceparent`), in-flight gauge, duration histogram (type
        "attempt") and one log line; the stream that carries it is not observed itself.
        """
        started = self._started(full_method)
        call = CarriedCall()
        with structlog.contextvars.bound_contextvars(**self._context_fields(request, {TRACEPARENT: traceparent})):
            try:
                yield call
            except (asyncio.CancelledError, GeneratorExit):
                call.code = "CANCELLED"
                raise
            except BaseException:
                call.code = "UNKNOWN"
                raise
            finally:
                self._finished(full_method, "attempt", started, call.code, peer, {})

    def _labels(self, full_method: str) -> tuple[str, str]:
        service, method = _split_method(full_method)
        if self._services is not None and service not in self._services:
            return "unknown", "unknown"
        return service, method

    def _started(self, full_method: str) -> float:
        self._metrics.server_in_flight.labels(*self._labels(full_method)).inc()
        return time.perf_counter()

    def _finished(
        self,
        full_method: str,
        kind: str,
        started: float,
        code: str,
        peer: str,
        extra: Mapping[str, Any],
    ) -> None:
        seconds = time.perf_counter() - started
        service, method = self._labels(full_method)
        self._metrics.server_in_flight.labels(service, method).dec()
        self._metrics.server_seconds.labels(service, method, kind, code).observe(seconds)
        line = log.warning if code in _SERVER_FAULTS else log.info
        if full_method.startswith(_QUIET_PREFIXES):
            line = log.debug
        line("rpc", method=bounded(full_method), code=code, duration_ms=round(seconds * 1000, 2), peer=peer, **extra)


async def _abort_undecodable(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable_error().message)


def _checking_unary(
    inner: Callable[[Any, Any], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _abort_undecodable(context)
        return await inner(request, context)

    return behavior


def _checking_stream(
    inner: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _abort_undecodable(context)
        async for response in inner(request, context):
            yield response

    return behavior


def _checking_each_request(
    inner: Callable[[Any, Any], AsyncIterator[Any]],
) -> Callable[[AsyncIterator[Any], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def behavior(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        async def checked() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await _abort_undecodable(context)
                yield request

        async for response in inner(checked(), context):
            yield response

    return behavior


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    # Read while the call is alive: peer() on a call the client already cancelled (a WatchJob closed
    # early) dereferences a freed grpc_call in cygrpc and kills the process with SIGSEGV.
    try:
        return str(context.peer())
    except Exception:
        return ""


CallT = TypeVar("CallT", bound=grpc.aio.Call)


def _outgoing_span(request: object) -> tuple[str, dict[str, Any]]:
    """A new span of an outgoing call, in the current trace (or a new one): its traceparent and log fields."""
    trace_id = structlog.contextvars.get_contextvars().get("trace_id") or new_trace_id()
    span_id = new_span_id()
    fields = {"trace_id": trace_id, "span_id": span_id, **_request_fields(request, trust_user_id=True)}
    return format_traceparent(trace_id, span_id), fields


class OutgoingCalls:
    """A `traceparent` on every call a client makes; its timing and one log line when it ends.

    The client calls `send` around each call instead of installing a grpc.aio client interceptor: an
    intercepted streaming call holds a task, an async generator and a wrapper for as long as the stream is
    open, about 1.5 kB for each of the thousands of 5-30 s Generate streams a JobService keeps.
    """

    def __init__(self, metrics: RpcMetrics | None) -> None:
        self._metrics = metrics
        self._watchers: set[asyncio.Task[None]] = set()

    def send(
        self,
        method: str,
        kind: str,
        request: object,
        metadata: Sequence[tuple[str, str]],
        invoke: Callable[[tuple[tuple[str, str], ...]], CallT],
    ) -> CallT:
        """`invoke(metadata)` starts the call with the caller's metadata and a traceparent; the call is returned."""
        traceparent, fields = _outgoing_span(request)
        call = invoke((*((k, v) for k, v in metadata if k != TRACEPARENT), (TRACEPARENT, traceparent)))
        self._watch(call, method, kind, fields)
        return call

    def carried(self, method: str, request: object) -> tuple[str, Callable[[str], None]]:
        """The traceparent of a call carried inside a stream (an attempt on GenerateMany), and what records its end.

        `done(code)` gives it the same timing and log line as a call of its own, of type "attempt".
        """
        traceparent, fields = _outgoing_span(request)
        started = time.perf_counter()

        def done(code: str) -> None:
            self._record(method, "attempt", started, code, fields)

        return traceparent, done

    def _record(self, method: str, kind: str, started: float, code: str, fields: Mapping[str, Any]) -> None:
        seconds = time.perf_counter() - started
        service, name = _split_method(method)
        if self._metrics is not None:
            self._metrics.client_seconds.labels(service, name, kind, code).observe(seconds)
        log.info("rpc call", method=method, code=code, duration_ms=round(seconds * 1000, 2), **fields)

    def _watch(self, call: grpc.aio.Call, method: str, kind: str, fields: dict[str, Any]) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()

        async def finished() -> None:
            try:
                code = _code_name(await call.code(), "UNKNOWN")
            except asyncio.CancelledError:
                code = "CANCELLED"
            except Exception:
                code = "UNKNOWN"
            self._record(method, kind, started, code, fields)

        def done(_call: object) -> None:
            # A task only once the call has ended (its code is ready then): nothing waits alongside each
            # of thousands of long Generate streams.
            task = loop.create_task(finished())
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

        call.add_done_callback(done)
