"""JobService's client of GeneratorService: protocol in, domain events and failures out."""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from google.rpc import code_pb2, status_pb2
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from imagegen_common.errors import ServiceError
from imagegen_common.grpc_errors import from_grpc_error, from_status_proto
from imagegen_common.rpc_observability import OutgoingCalls
from job_service.domain import (
    GenerationCompleted,
    GenerationEvent,
    GenerationFailure,
    GenerationStarted,
    ImageStored,
    Job,
    ModelInfo,
    StoredImage,
)
from job_service.mailbox import Mailbox

_SERVICE = pb.DESCRIPTOR.services_by_name["GeneratorService"].full_name
GENERATE_MANY = f"/{_SERVICE}/GenerateMany"
LIST_MODELS = f"/{_SERVICE}/ListModels"
DELETE_JOB_OBJECTS = f"/{_SERVICE}/DeleteJobObjects"

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


# A new GenerateMany stream is opened when every open one carries this many attempts, so that under load the
# attempts spread over as many streams (and through round_robin over as many generator replicas) as they fill.
_ATTEMPTS_PER_STREAM = 64


class _Stream:
    """One GenerateMany stream: what it carries, and the queue its starts and stops are sent from."""

    def __init__(self, opened_at: float) -> None:
        self.outgoing: asyncio.Queue[pb.GenerateManyRequest | None] = asyncio.Queue()  # None half-closes it
        self.inboxes: dict[tuple[str, int], Mailbox[pb.GenerateManyResponse | GenerationFailure]] = {}
        self.opened_at = opened_at
        self.accepting = True  # new attempts may start here
        self.reader: asyncio.Task[None] | None = None

    async def requests(self) -> AsyncIterator[pb.GenerateManyRequest]:
        while (request := await self.outgoing.get()) is not None:
            yield request

    def retire(self) -> None:
        """No new attempts here; the stream is half-closed once the last one on it has ended."""
        self.accepting = False
        if not self.inboxes:
            self.outgoing.put_nowait(None)


class GeneratorClient:
    """Runs attempts on the generator, many to a GenerateMany stream.

    Each attempt keeps its own deadline, trace, log line and errors, as if it were a call of its own. Streams
    open as the attempts need them (at least `min_streams`, spread by round_robin over the generator's
    replicas) and are retired after `stream_max_age_seconds`, so a replica that joins gets its share.
    """

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
        min_streams: int = 8,
        stream_max_age_seconds: float = 60.0,
        calls: OutgoingCalls | None = None,
        input_blobs: Callable[[str, list[str]], Awaitable[dict[str, bytes]]] | None = None,
    ) -> None:
        # Reads a user's stored input images by sha256 (JobStore.input_blobs).
        self._input_blobs = input_blobs
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
        self._min_streams = min_streams
        self._stream_max_age = stream_max_age_seconds
        self._streams: list[_Stream] = []  # open, accepting or not
        self._turn = 0

    async def close(self) -> None:
        readers = [stream.reader for stream in self._streams if stream.reader is not None]
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await self._channel.close()

    def _person_generation(self, job: Job) -> str:
        """The job's person_generation, except on a model that has none: a job created before CreateJob refused it
        there carries the old default ("allow_adult"), which the generator would now refuse (and which the old
        generator dropped). CreateJob refuses an explicit value on such a model, so nothing a caller chose is lost."""
        info = self._models.get(job.model)
        if info is not None and not info.person_generation_options:
            return ""
        return job.params.person_generation

    async def _input_images(self, job: Job) -> list[pb.InputImage]:
        """The job's input images for the generator, in order: stored bytes, or the storage key of an earlier job's
        image (which the generator reads itself, so it is not sent twice)."""
        refs = job.params.input_images
        if not refs:
            return []
        digests = [r.sha256 for r in refs if r.sha256]
        blobs = await self._input_blobs(job.user_id, digests) if digests and self._input_blobs else {}
        images = []
        for ref in refs:
            if ref.sha256 and ref.sha256 not in blobs:
                raise GenerationFailure(
                    "INPUT_IMAGE_MISSING", f"input image {ref.sha256} of job {job.id} is not stored", retryable=False
                )
            if ref.sha256:
                images.append(pb.InputImage(data=blobs[ref.sha256], mime_type=ref.mime_type))
            else:
                images.append(pb.InputImage(storage_path=ref.storage_path, mime_type=ref.mime_type))
        return images

    async def generate(self, job: Job) -> AsyncGenerator[GenerationEvent, None]:
        """Runs one attempt; leaving the iteration early (or cancelling) stops it at the generator."""
        request = pb.GenerateRequest(
            job_id=job.id,
            attempt=job.attempt,
            user_id=job.user_id,
            prompt=job.prompt,
            model=job.model,
            # Only what earlier attempts did not deliver: their images stay the job's (docs/durability.md).
            sample_count=job.images_owed,
            aspect_ratio=job.params.aspect_ratio,
            image_size=job.params.image_size,
            person_generation=self._person_generation(job),
            output_mime_type=job.params.output_mime_type,
            seed=job.params.seed,
            add_watermark=job.params.add_watermark,
            enhance_prompt=job.params.enhance_prompt,
            negative_prompt=job.params.negative_prompt,
            safety_setting=job.params.safety_setting,
            language=job.params.language,
            jpeg_quality=job.params.jpeg_quality,
            input_images=await self._input_images(job),
        )
        key = (job.id, job.attempt)
        stream = self._stream_with_room()
        inbox: Mailbox[pb.GenerateManyResponse | GenerationFailure] = Mailbox()
        stream.inboxes[key] = inbox
        traceparent, record = self._calls.carried(GENERATE_MANY, request)
        stream.outgoing.put_nowait(
            pb.GenerateManyRequest(start=pb.StartAttempt(request=request, traceparent=traceparent))
        )
        deadline = asyncio.get_running_loop().time() + self._timeout
        code, ended = "CANCELLED", False
        try:
            while True:
                try:
                    # The deadline is awaited around each read only: a timeout must not span the yields.
                    async with asyncio.timeout_at(deadline):
                        item = await inbox.get()
                except TimeoutError:
                    code = "DEADLINE_EXCEEDED"
                    message = f"no answer within {self._timeout:g} s"
                    raise GenerationFailure("DEADLINE_EXCEEDED", message, retryable=True) from None
                if isinstance(item, GenerationFailure):  # the stream broke or ended under the attempt
                    code, ended = "UNAVAILABLE", True
                    raise item
                if item.HasField("error"):
                    code, ended = code_pb2.Code.Name(item.error.code), True
                    failure = _attempt_failure(item.error)
                    if failure.reason == "GENERATOR_UNAVAILABLE":
                        stream.accepting = False  # a draining generator: start nothing more here (retired below)
                    raise failure
                event = _event(item.event)
                if event is None:
                    continue
                if isinstance(event, GenerationCompleted):
                    code, ended = "OK", True
                yield event
                if ended:
                    return
        finally:
            del stream.inboxes[key]
            if not ended:
                stream.outgoing.put_nowait(
                    pb.GenerateManyRequest(stop=pb.StopAttempt(job_id=job.id, attempt=job.attempt))
                )
            if not stream.accepting:
                stream.retire()
            record(code)

    def _stream_with_room(self) -> _Stream:
        now = time.monotonic()
        for stream in self._streams:
            if stream.accepting and now - stream.opened_at >= self._stream_max_age:
                stream.retire()
        open_ = [stream for stream in self._streams if stream.accepting]
        if open_:
            # The least loaded, taking turns among equals (so one attempt at a time still spreads).
            self._turn = (self._turn + 1) % len(open_)
            turned = open_[self._turn :] + open_[: self._turn]
            least = min(turned, key=lambda stream: len(stream.inboxes))
            if len(open_) >= self._min_streams and len(least.inboxes) < _ATTEMPTS_PER_STREAM:
                return least
        return self._open_stream(now)

    def _open_stream(self, now: float) -> _Stream:
        stream = _Stream(now)
        # No deadline on the stream itself: each attempt has its own.
        call = self._stub.GenerateMany(stream.requests(), metadata=self._metadata)
        # A context of its own: the stream serves many attempts, not the one whose log context opened it.
        reader = self._read(stream, call)
        stream.reader = asyncio.get_running_loop().create_task(
            reader, name="generate-many", context=contextvars.Context()
        )
        self._streams.append(stream)
        return stream

    async def _read(
        self, stream: _Stream, call: grpc.aio.StreamStreamCall[pb.GenerateManyRequest, pb.GenerateManyResponse]
    ) -> None:
        """Hands each answer to its attempt; when the stream ends, every attempt still on it fails, uncounted."""
        failure = GenerationFailure(
            "GENERATOR_UNAVAILABLE", "the generator ended the stream", retryable=True, counts=False
        )
        try:
            async for response in call:
                inbox = stream.inboxes.get((response.job_id, response.attempt))
                if inbox is not None:  # else an attempt that has been stopped: its last words
                    inbox.put(response)
        except grpc.aio.AioRpcError as error:
            failure = _failure(error)
            if failure.counts:  # no attempt is to blame for a whole stream's failure
                failure = GenerationFailure("GENERATOR_UNAVAILABLE", failure.message, retryable=True, counts=False)
        finally:
            stream.accepting = False
            self._streams.remove(stream)
            call.cancel()
            # gRPC's task that sends the requests waits on the queue until it ends, also once the call has.
            stream.outgoing.put_nowait(None)
            for inbox in stream.inboxes.values():
                inbox.put(failure)

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
                        display_name=m.display_name,
                        provider=m.provider,
                        max_input_images=m.max_input_images,
                        thinking=m.thinking,
                        parameters=list(m.parameters),
                        safety_settings=list(m.safety_settings),
                        languages=list(m.languages),
                    )
                    for m in response.models
                }
                self._models_at = time.monotonic()
        return self._models

    async def delete_job_objects(
        self, user_id: str, job_id: str, keep_paths: list[str], *, timeout_seconds: float
    ) -> list[str]:
        """Deletes the job's objects but `keep_paths` at the generator; the keys deleted.

        Raises GenerationFailure (reason and message from the generator's ErrorInfo) when it fails.
        """
        request = pb.DeleteJobObjectsRequest(user_id=user_id, job_id=job_id, keep_paths=keep_paths)
        try:
            response = await self._calls.send(
                DELETE_JOB_OBJECTS,
                "unary",
                request,
                self._metadata,
                lambda metadata: self._stub.DeleteJobObjects(request, timeout=timeout_seconds, metadata=metadata),
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        return list(response.deleted_paths)


def _event(response: pb.GenerateResponse) -> GenerationEvent | None:
    """The domain event of an answer; None for a kind this JobService does not know (a newer generator's)."""
    kind = response.WhichOneof("event")
    if kind == "started":
        return GenerationStarted(response.started.provider)
    if kind == "image_stored":
        s = response.image_stored
        # s.index counts within the attempt; imagegen_advance stores the job-level index (delivery order).
        return ImageStored(StoredImage(s.index, s.url, s.storage_path, s.mime_type, s.width, s.height, s.size_bytes))
    if kind == "completed":
        c = response.completed
        return GenerationCompleted(c.delivered_count, c.filtered_count, list(c.filtered_reasons))
    return None


def _failure(error: grpc.aio.AioRpcError) -> GenerationFailure:
    return _classified(error.code(), from_grpc_error(error, default_reason=error.code().name))


def _attempt_failure(error: pb.AttemptError) -> GenerationFailure:
    name = code_pb2.Code.Name(error.code) if error.code in code_pb2.Code.values() else "UNKNOWN"
    status = status_pb2.Status(code=error.code, message=error.message, details=error.details)
    return _classified(grpc.StatusCode[name], from_status_proto(name, status, default_reason=name))


def _classified(code: grpc.StatusCode, detail: ServiceError) -> GenerationFailure:
    stated = detail.metadata.get("retryable")
    if detail.reason == "DRAINING":
        # The generator is shutting down and refused to start the attempt: like one that is down, not the job's fault.
        return GenerationFailure("GENERATOR_UNAVAILABLE", detail.message, retryable=True, counts=False)
    if stated is not None:
        return GenerationFailure(
            detail.reason, detail.message, retryable=stated == "true", counts=True, retry_after=detail.retry_after
        )
    # No ErrorInfo: the generator never answered (down, unreachable, overloaded) or went away mid-call
    # (killed: UNAVAILABLE; shut down past its grace: UNAVAILABLE or CANCELLED, as our own cancels
    # never get here). Wait for it.
    retryable = code in _RETRYABLE_CODES
    unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    return GenerationFailure(
        "GENERATOR_UNAVAILABLE" if unreachable else detail.reason,
        detail.message or code.name,
        retryable=retryable,
        counts=not unreachable,
        retry_after=detail.retry_after,
    )
