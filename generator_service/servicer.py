"""GeneratorService over gRPC: protobuf <-> domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from google.rpc import code_pb2
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.cleanup import ObjectCleaner
from generator_service.domain import Completed, GenerationEvent, GenerationRequest, InputImage, Started, Stored
from generator_service.generation import Generator
from imagegen_common.decoding import decoded
from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.grpc_errors import service_error, stream_errors, to_status_proto, unary_errors
from imagegen_common.rpc_observability import ServerObservability, peer_of

DOMAIN = "imagegen.generator.v1"
GENERATE_MANY = f"/{pb.DESCRIPTOR.services_by_name['GeneratorService'].full_name}/GenerateMany"
_CHANGED = object()  # wakes a GenerateMany stream to look whether it is done


def request_from_proto(request: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        job_id=request.job_id,
        attempt=request.attempt,
        user_id=request.user_id,
        prompt=request.prompt,
        model=request.model,
        sample_count=request.sample_count,
        aspect_ratio=request.aspect_ratio or "1:1",
        image_size=request.image_size or "1K",
        person_generation=request.person_generation,
        output_mime_type=request.output_mime_type or "image/png",
        seed=request.seed if request.HasField("seed") else None,
        add_watermark=request.add_watermark if request.HasField("add_watermark") else None,
        enhance_prompt=request.enhance_prompt if request.HasField("enhance_prompt") else None,
        negative_prompt=request.negative_prompt,
        safety_setting=request.safety_setting,
        language=request.language,
        jpeg_quality=request.jpeg_quality,
        input_images=tuple(InputImage(i.data, i.mime_type, i.storage_path) for i in request.input_images),
    )


def response_of(event: GenerationEvent) -> pb.GenerateResponse:
    match event:
        case Started():
            return pb.GenerateResponse(started=pb.GenerationStarted(provider=event.provider, model=event.model))
        case Stored():
            return pb.GenerateResponse(
                image_stored=pb.ImageStored(
                    index=event.index,
                    url=event.url,
                    storage_path=event.storage_path,
                    mime_type=event.mime_type,
                    width=event.width,
                    height=event.height,
                    size_bytes=event.size_bytes,
                )
            )
        case Completed():
            return pb.GenerateResponse(
                completed=pb.GenerationCompleted(
                    delivered_count=event.delivered_count,
                    filtered_count=event.filtered_count,
                    filtered_reasons=event.filtered_reasons,
                )
            )
    raise TypeError(f"not a generation event: {event!r}")


def attempt_error(err: ServiceError) -> pb.AttemptError:
    status = to_status_proto(err, DOMAIN)
    return pb.AttemptError(code=status.code, message=status.message, details=status.details)


def draining_error() -> pb.AttemptError:
    return attempt_error(
        ServiceError(
            ErrorKind.UNAVAILABLE,
            "DRAINING",
            "this generator is shutting down; start the attempt elsewhere",
            metadata={"retryable": "true"},
        )
    )


class GeneratorServicer(pb_grpc.GeneratorServiceServicer):
    def __init__(self, generator: Generator, observability: ServerObservability, cleaner: ObjectCleaner) -> None:
        self._generator = generator
        self._cleaner = cleaner
        self._observability = observability
        self._draining = False
        self._streams: set[asyncio.Queue[Any]] = set()  # the outboxes of the GenerateMany streams open

    def open_streams(self) -> int:
        return len(self._streams)

    def drain(self) -> None:
        """New attempts on open GenerateMany streams are refused, and each stream ends once its own have."""
        self._draining = True
        for outbox in self._streams:
            outbox.put_nowait(_CHANGED)

    @stream_errors(DOMAIN)
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: closing this stream closes the attempt (and its provider calls) at once, not at collection.
        async with contextlib.aclosing(self._generator.run(request_from_proto(decoded(request)))) as events:
            async for event in events:
                yield response_of(event)

    @stream_errors(DOMAIN)  # a start or stop that does not parse ends the stream INVALID_ARGUMENT
    async def GenerateMany(
        self, requests: AsyncIterator[pb.GenerateManyRequest], context: Any
    ) -> AsyncIterator[pb.GenerateManyResponse]:
        # One task reads the caller's starts and stops, one task per attempt runs it, and this generator is
        # the stream's only writer: it sends what they queue, in order, and ends the stream once the caller
        # has half-closed it (or this generator drains) and no attempt is left on it.
        peer = peer_of(context)
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        running: dict[tuple[str, int], asyncio.Task[None]] = {}
        stopping: set[asyncio.Task[None]] = set()  # stopped, still cleaning up: waited for when the stream ends

        async def attempt(start: pb.StartAttempt) -> None:
            job_id, number = start.request.job_id, start.request.attempt
            with self._observability.carried(GENERATE_MANY, start.request, start.traceparent, peer) as call:
                try:
                    runs = self._generator.run(request_from_proto(start.request))
                    async with contextlib.aclosing(runs) as events:
                        async for event in events:
                            outbox.put_nowait(
                                pb.GenerateManyResponse(job_id=job_id, attempt=number, event=response_of(event))
                            )
                except Exception as exc:
                    error = attempt_error(service_error(exc))
                    call.code = code_pb2.Code.Name(error.code)
                    outbox.put_nowait(pb.GenerateManyResponse(job_id=job_id, attempt=number, error=error))

        def begin(start: pb.StartAttempt) -> None:
            key = (start.request.job_id, start.request.attempt)
            task = asyncio.create_task(attempt(start), name=f"attempt-{key[0]}-{key[1]}")
            running[key] = task

            # A callback, not a `finally`: it also runs for a task stopped before it ever started.
            def ended(_task: asyncio.Task[None]) -> None:
                if running.get(key) is task:
                    del running[key]
                stopping.discard(task)
                outbox.put_nowait(_CHANGED)

            task.add_done_callback(ended)

        async def read() -> None:
            try:
                await read_all()
            finally:
                outbox.put_nowait(_CHANGED)  # ended, or failed (a message that does not parse): look now

        async def read_all() -> None:
            async for message in requests:
                request = decoded(message)
                if request.HasField("start"):
                    job_id, number = request.start.request.job_id, request.start.request.attempt
                    if self._draining:
                        outbox.put_nowait(
                            pb.GenerateManyResponse(job_id=job_id, attempt=number, error=draining_error())
                        )
                    elif (job_id, number) in running:
                        already = ServiceError(
                            ErrorKind.ALREADY_EXISTS,
                            "ATTEMPT_RUNNING",
                            f"attempt {number} of job {job_id} already runs on this stream",
                            metadata={"retryable": "false"},
                        )
                        outbox.put_nowait(
                            pb.GenerateManyResponse(job_id=job_id, attempt=number, error=attempt_error(already))
                        )
                    else:
                        begin(request.start)
                elif request.HasField("stop"):
                    # Gone from `running` at once: the same attempt may start again right after its stop.
                    task = running.pop((request.stop.job_id, request.stop.attempt), None)
                    if task is not None:
                        stopping.add(task)
                        task.cancel()

        reader = asyncio.create_task(read(), name="generate-many-reader")
        self._streams.add(outbox)
        try:
            while True:
                item = await outbox.get()
                failed = reader.exception() if reader.done() and not reader.cancelled() else None
                if failed is not None:
                    raise failed  # the caller's side of the stream broke: its attempts stop (finally) with it
                if item is not _CHANGED:
                    yield item
                elif not running and outbox.empty() and (reader.done() or self._draining):
                    return
        finally:
            self._streams.discard(outbox)
            tasks = [reader, *running.values(), *stopping]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @unary_errors(DOMAIN)
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        decoded(request)
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    id=m.id,
                    provider=m.provider,
                    display_name=m.display_name,
                    aspect_ratios=m.aspect_ratios,
                    image_sizes=m.image_sizes,
                    max_sample_count=m.max_sample_count,
                    person_generation_options=m.person_generation_options,
                    provider_price_usd=m.provider_price_usd,
                    max_input_images=m.max_input_images,
                    thinking=m.thinking,
                    parameters=m.honoured_parameters,
                    safety_settings=m.safety_settings,
                    languages=m.languages,
                )
                for m in self._generator.list_models()
            ]
        )

    @unary_errors(DOMAIN)
    async def DeleteJobObjects(self, request: pb.DeleteJobObjectsRequest, context: Any) -> pb.DeleteJobObjectsResponse:
        deleted = await self._cleaner.delete_job_objects(request.user_id, request.job_id, list(request.keep_paths))
        return pb.DeleteJobObjectsResponse(deleted_paths=deleted)
