"""The HTTP side of every cloud provider: its connection pools, per-model limits, retries.

A provider hands over a JSON body and gets back the raw bytes of a 2xx answer, or an `HttpFailure`
once retrying is pointless or the budget is spent. Turning failures into ServiceErrors is left to
`providers.errors`, because what a status means differs slightly per API (a 404 on the Gemini API's
:predict means "shut down", a 400 on :predict may be a blocked prompt).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import structlog

from generator_service import timeouts
from generator_service.config import ModelSpec
from generator_service.providers.limits import ModelLimits
from generator_service.providers.memory import MemoryBudget
from generator_service.retry import RetryPolicy, parse_retry_after

# Requests above this (a prompt with input images) reserve memory like answers do; a text prompt never does.
LARGE_REQUEST_BYTES = 64 * 1024

log = structlog.get_logger(__name__)

# 502 is not in Google's list, but it is what a load balancer says when a backend restarts: transient.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_MESSAGE_CHARS = 500
# httpcore walks every connection and every waiting request of its pool whenever a request starts or ends,
# so one pool with thousands of long requests costs O(n) per event, O(n^2) in all: with 2,000 requests in
# flight that walk was 44 % of the generator's CPU. Requests are spread over this many pools instead.
POOL_LANES = 16


@dataclass
class HttpFailure(Exception):
    """A provider request that did not succeed. `status` is None when no answer came (timeout, network)."""

    status: int | None
    message: str
    google_status: str | None = None
    retry_after: float | None = None
    timed_out: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUSES

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status is not None else self.message


# The setting behind each of httpx's timeouts (see create: write shares the read timeout; the pool has none, the
# per-model limiters bound that wait instead).
_TIMEOUT_SETTINGS = {
    "connect": "GEN_PROVIDER_CONNECT_TIMEOUT_SECONDS",
    "read": "GEN_PROVIDER_READ_TIMEOUT_SECONDS",
    "write": "GEN_PROVIDER_READ_TIMEOUT_SECONDS",
}


def timeout_message(exc: httpx.TimeoutException) -> str:
    which, _seconds = timeouts.which_timeout(exc)
    return f"no answer in time: {timeouts.describe(exc, _TIMEOUT_SETTINGS.get(which, 'no setting'))}"


class RequestAuth(Protocol):
    async def headers(self) -> Mapping[str, str]:
        """Headers that authenticate one request (fetched again before every retry)."""
        ...

    def invalidate(self) -> bool:
        """Forgets cached credentials after a 401; True if asking again may help."""
        ...


class ApiKeyAuth:
    """The Gemini API's `x-goog-api-key` header."""

    def __init__(self, api_key: str) -> None:
        self._headers = {"x-goog-api-key": api_key}

    async def headers(self) -> Mapping[str, str]:
        return self._headers

    def invalidate(self) -> bool:
        return False


def failure_from_response(response: httpx.Response) -> HttpFailure:
    """Reads Google's error body ({"error": {"code", "message", "status"}}) when there is one."""
    message, google_status = "", None
    try:
        error = json.loads(response.content).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            google_status = str(error["status"]) if error.get("status") else None
    except (ValueError, AttributeError):
        pass
    if not message:
        message = response.text.strip() or response.reason_phrase
    return HttpFailure(
        response.status_code,
        message[:_MAX_MESSAGE_CHARS],
        google_status,
        parse_retry_after(response.headers.get("retry-after")),
    )


class ProviderHttp:
    """One per provider: owns its connection pools, its models' limiters and the retry loop."""

    def __init__(
        self,
        provider: str,
        clients: Sequence[httpx.AsyncClient],
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        memory: MemoryBudget | None = None,
    ) -> None:
        self._provider = provider
        self._memory = memory
        self._clients = list(clients)
        self._in_flight = [0] * len(self._clients)
        self._policy = policy
        self._limits = ModelLimits()
        self._clock = clock
        self._sleep = sleep

    @classmethod
    def create(
        cls,
        provider: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        policy: RetryPolicy,
        memory: MemoryBudget | None = None,
        lanes: int = POOL_LANES,
    ) -> ProviderHttp:
        # No pool timeout: the per-model limiters already bound how many requests wait for a connection.
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None)
        # No connection cap either: httpx's default of 100 would quietly hold every provider to 100 requests
        # in flight, whatever the models' max_concurrency says; those limiters are the cap. Idle connections
        # kept: 8 per pool, 128 in all, because httpcore checks every idle connection of a pool (a syscall
        # each) whenever a request starts or ends (256 in one pool cost the bench's e2e burst about 25 %
        # more generator CPU per job than 32), and each idle one holds buffers.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=8)
        tls = httpx.create_ssl_context()  # one CA bundle loaded, shared by every pool
        clients = [httpx.AsyncClient(timeout=timeout, limits=limits, verify=tls) for _ in range(max(1, lanes))]
        return cls(provider, clients, policy, memory=memory)

    async def post_json(self, model: ModelSpec, url: str, body: Mapping[str, Any], auth: RequestAuth) -> bytes:
        """POSTs `body` with retries; returns the 2xx body or raises HttpFailure.

        Cancellation is never caught here: it aborts the request in flight, which closes its
        connection, so the provider stops work it would otherwise bill for.
        """
        payload = json.dumps(body, separators=(",", ":")).encode()
        if self._memory is not None and len(payload) > LARGE_REQUEST_BYTES:
            # Input images make requests of megabytes (base64, once per call of the attempt), held with the images
            # they were made from until the attempt ends: they count against the same budget as answers.
            await self._memory.reserve_answer(len(payload))
        limiter = self._limits.for_model(model)
        started = self._clock()
        retries = 0
        reauthenticated = False
        while True:
            headers = {"content-type": "application/json", **(await auth.headers())}
            try:
                async with limiter.request_slot():
                    response, content = await self._send(url, payload, headers)
            except httpx.TimeoutException as exc:
                failure = HttpFailure(None, timeout_message(exc), timed_out=True)
            except httpx.TransportError as exc:
                failure = HttpFailure(None, f"connection failed ({type(exc).__name__}: {exc})")
            else:
                if response.is_success:
                    return content
                failure = failure_from_response(response)
                if response.status_code == 401 and not reauthenticated and auth.invalidate():
                    # An access token can expire between our check and Google's; one fresh token is worth it.
                    reauthenticated = True
                    continue
            if not failure.retryable:
                raise failure
            delay = self._policy.next_delay(retries, self._clock() - started, failure.retry_after)
            if delay is None:
                raise failure
            retries += 1
            log.warning(
                "provider request failed; retrying",
                provider=self._provider,
                model=model.id,
                status=failure.status,
                error=failure.message,
                retry=retries,
                delay_seconds=round(delay, 3),
            )
            await self._sleep(delay)

    async def _send(self, url: str, payload: bytes, headers: Mapping[str, str]) -> tuple[httpx.Response, bytes]:
        """One POST and its answer, read in full; a successful answer first reserves memory (providers.memory).

        A successful body is collected here rather than with `aread()`, which would keep it on the response:
        httpx's Response and its stream refer to each other, so a response lives until the cyclic garbage
        collector runs, and with it tens of MB of 2K images per answer (a 50-job 2K burst grew the process
        past 1.5 GB that way).
        """
        # The least busy pool (the first of equals, so a quiet service keeps reusing the same connections).
        lane = self._in_flight.index(min(self._in_flight))
        client = self._clients[lane]
        self._in_flight[lane] += 1
        try:
            return await self._send_on(client, url, payload, headers)
        finally:
            self._in_flight[lane] -= 1

    async def _send_on(
        self, client: httpx.AsyncClient, url: str, payload: bytes, headers: Mapping[str, str]
    ) -> tuple[httpx.Response, bytes]:
        response = await client.send(client.build_request("POST", url, content=payload, headers=headers), stream=True)
        reserved = 0
        try:
            if not response.is_success:
                await response.aread()  # small; failure_from_response reads it
                return response, b""
            size = int(response.headers.get("content-length") or 0)
            if self._memory is not None and size:
                reserved = await self._memory.reserve_answer(size)
            content = b"".join([chunk async for chunk in response.aiter_bytes()])
            if self._memory is not None and not size:
                reserved = await self._memory.reserve_answer(len(content))  # chunked: known only now
            return response, content
        except BaseException:
            if reserved and self._memory is not None:
                self._memory.forget(reserved)
            raise
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(*(client.aclose() for client in self._clients))
