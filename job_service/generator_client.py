"""JobService's client of GeneratorService: protocol in, domain events and failures out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from imagegen_common.grpc_errors import from_grpc_error
from imagegen_common.rpc_observability import OutgoingCalls
from job_service.domain import (
    GenerationDone,
    GenerationEvent,
    GenerationFailure,
    GenerationStarted,
    ImageStored,
    Job,
    ModelInfo,
    StoredImage,
)

_SERVICE = pb.DESCRIPTOR.services_by_name["GeneratorService"].full_name
GENERATE = f"/{_SERVICE}/Generate"
LIST_MODELS = f"/{_SERVICE}/ListModels"

# Codes after which another attempt can help, when the generator did not say either way.
_RETRYABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


def channel_options() -> list[tuple[str, object]]:
    # round_robin over every address the target resolves to (dns:///generator:50052 in compose/k8s, or
    # a list: ipv4:10.0.0.1:50052,10.0.0.2:50052); keepalives notice a dead replica within seconds
    # instead of waiting for TCP (the servers accept them: imagegen_common.grpc_server); a replica that
    # comes back is reconnected within seconds rather than after gRPC's default 2-minute backoff.
    service_config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.dns_min_time_between_resolutions_ms", 5_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # No retry filter: it keeps about 5.6 kB of state for every Generate stream for its whole 5-30 s (11 MB
        # of JobService's peak with 2,000 jobs in flight), and no retry policy is configured. What it still did
        # is the transparent retry of a stream a generator refused unseen as it shut down; that stream now
        # fails UNAVAILABLE, which the dispatcher retries after its usual backoff without counting an attempt.
        ("grpc.enable_retries", 0),
    ]


class GeneratorClient:
    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        call_timeout_seconds: float = 600.0,
        models_ttl_seconds: float = 60.0,
        calls: OutgoingCalls | None = None,
    ) -> None:
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes(),
                private_key=tls_key.read_bytes() if tls_key else None,
                certificate_chain=tls_cert.read_bytes() if tls_cert else None,
            )
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options())
        self._calls = calls or OutgoingCalls(None)
        self._stub = pb_grpc.GeneratorServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = call_timeout_seconds
        self._models: dict[str, ModelInfo] = {}
        self._models_at = float("-inf")
        self._models_ttl = models_ttl_seconds
        self._models_lock = asyncio.Lock()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        """Runs one attempt; leaving the iteration early (or cancelling) cancels the stream."""
        request = pb.GenerateRequest(
            job_id=job.id,
            attempt=job.attempt,
            user_id=job.user_id,
            prompt=job.prompt,
            model=job.model,
            sample_count=job.params.sample_count,
            aspect_ratio=job.params.aspect_ratio,
            image_size=job.params.image_size,
            person_generation=job.params.person_generation,
            output_mime_type=job.params.output_mime_type,
        )
        call = self._calls.send(
            GENERATE,
            "server_stream",
            request,
            self._metadata,
            lambda metadata: self._stub.Generate(request, timeout=self._timeout, metadata=metadata),
        )
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "started":
                    yield GenerationStarted(response.started.provider)
                elif kind == "image_stored":
                    s = response.image_stored
                    yield ImageStored(
                        StoredImage(s.index, s.url, s.storage_path, s.mime_type, s.width, s.height, s.size_bytes)
                    )
                elif kind == "completed":
                    c = response.completed
                    yield GenerationDone(c.delivered_count, c.filtered_count, list(c.filtered_reasons))
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        finally:
            call.cancel()

    async def list_models(self) -> dict[str, ModelInfo]:
        """The generator's models, cached for a while; raises GenerationFailure when unreachable."""
        if time.monotonic() - self._models_at < self._models_ttl:
            return self._models
        async with self._models_lock:
            if time.monotonic() - self._models_at >= self._models_ttl:
                try:
                    request = pb.ListModelsRequest()
                    response = await self._calls.send(
                        LIST_MODELS,
                        "unary",
                        request,
                        self._metadata,
                        lambda metadata: self._stub.ListModels(request, timeout=5.0, metadata=metadata),
                    )
                except grpc.aio.AioRpcError as error:
                    raise _failure(error) from None
                self._models = {
                    m.id: ModelInfo(
                        m.id,
                        list(m.aspect_ratios),
                        list(m.image_sizes),
                        m.max_sample_count,
                        list(m.person_generation_options),
                    )
                    for m in response.models
                }
                self._models_at = time.monotonic()
        return self._models


def _failure(error: grpc.aio.AioRpcError) -> GenerationFailure:
    detail = from_grpc_error(error, default_reason=error.code().name)
    stated = detail.metadata.get("retryable")
    if stated is not None:
        return GenerationFailure(detail.reason, detail.message, stated == "true", True, detail.retry_after)
    # No ErrorInfo: the generator never answered (down, unreachable, overloaded) or went away mid-call
    # (killed: UNAVAILABLE; shut down past its grace: UNAVAILABLE or CANCELLED, as our own cancels
    # never get here). Wait for it.
    retryable = error.code() in _RETRYABLE_CODES
    unreachable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    return GenerationFailure(
        "GENERATOR_UNAVAILABLE" if unreachable else detail.reason,
        detail.message or error.code().name,
        retryable,
        counts=not unreachable,
        retry_after=detail.retry_after,
    )
