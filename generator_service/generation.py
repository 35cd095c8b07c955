"""One attempt at one job: validate, call the provider, store each image as it arrives, report events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import structlog

from generator_service.config import ModelSpec
from generator_service.domain import (
    MIME_EXTENSIONS,
    Completed,
    FilteredImage,
    GeneratedImage,
    GenerationEvent,
    GenerationRequest,
    Started,
    Stored,
    generation_error,
    id_violations,
)
from generator_service.providers.base import Provider
from generator_service.providers.memory import AttemptHoldings
from generator_service.storage.base import Storage
from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError

log = structlog.get_logger(__name__)


def validate(request: GenerationRequest, model: ModelSpec) -> None:
    # The ids name the folder the images are stored in: UUIDs only (see domain.job_folder).
    problems = id_violations(request.user_id, request.job_id)
    if request.attempt < 1:
        problems.append(FieldViolation("attempt", "must be at least 1"))
    if not request.prompt.strip():
        problems.append(FieldViolation("prompt", "required"))
    if not 1 <= request.sample_count <= model.max_sample_count:
        problems.append(FieldViolation("sample_count", f"must be 1-{model.max_sample_count} for {model.id}"))
    if request.aspect_ratio not in model.aspect_ratios:
        problems.append(FieldViolation("aspect_ratio", f"must be one of {', '.join(model.aspect_ratios)}"))
    if request.image_size not in model.image_sizes:
        problems.append(FieldViolation("image_size", f"must be one of {', '.join(model.image_sizes)} for {model.id}"))
    if request.person_generation not in model.person_generation_options:
        problems.append(
            FieldViolation("person_generation", f"must be one of {', '.join(model.person_generation_options)}")
        )
    if request.output_mime_type not in MIME_EXTENSIONS:
        problems.append(FieldViolation("output_mime_type", f"must be one of {', '.join(MIME_EXTENSIONS)}"))
    if problems:
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            f"invalid request: {summary}",
            problems,
            metadata={"retryable": "false"},
        )


class Generator:
    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        providers: Mapping[str, Provider],
        storage: Storage,
        max_parallel_uploads: int = 4,
    ) -> None:
        self._models = dict(models)
        self._providers = dict(providers)
        self._storage = storage
        self._upload_slots = max_parallel_uploads

    def list_models(self) -> list[ModelSpec]:
        return list(self._models.values())

    async def run(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        model = self._models.get(request.model)
        if model is None:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                "UNKNOWN_MODEL",
                f"model {request.model!r} is not served here; ListModels lists the models",
                [FieldViolation("model", "unknown model")],
                metadata={"retryable": "false"},
            )
        validate(request, model)
        provider = self._providers[model.provider]
        yield Started(provider.name, model.id)

        slots = asyncio.Semaphore(self._upload_slots)
        uploads: set[asyncio.Task[Stored]] = set()
        filtered: list[FilteredImage] = []
        delivered = 0

        async def store(image: GeneratedImage) -> Stored:
            async with slots:
                path = request.storage_path(image.index, image.mime_type)
                try:
                    uploaded = await self._storage.upload(path, image.data, image.mime_type)
                except ServiceError:
                    raise
                except Exception as exc:  # any other storage fault: worth another attempt
                    raise generation_error(
                        ErrorKind.UNAVAILABLE, "STORAGE_FAILED", f"storing {path} failed: {exc}", retryable=True
                    ) from exc
                # The object's real key (prefix included), so a reader can find or re-sign it.
                return Stored(
                    image.index, uploaded.url, uploaded.key, image.mime_type, image.width, image.height, len(image.data)
                )

        # The provider runs in a task of its own that starts an upload per image, and this generator yields
        # each finished task (an upload, or the provider's end) in the order they finish. So a failed upload
        # is seen at once, not only when the provider has its next image, and the provider's generator is
        # only ever driven by that one task.
        finished: asyncio.Queue[asyncio.Task[Any]] = asyncio.Queue()
        # Memory the provider's answers reserve (providers.memory), held until this attempt is done with them.
        holdings = AttemptHoldings()

        async def produce() -> None:
            holdings.bind()
            # aclosing: whatever ends this task (the attempt failing, the caller cancelling) closes the
            # provider's generator right here, so its pending calls stop now rather than when it is collected.
            async with contextlib.aclosing(provider.generate(request, model)) as items:
                async for item in items:
                    if isinstance(item, FilteredImage):
                        filtered.append(item)
                        continue
                    upload = asyncio.create_task(store(item))
                    uploads.add(upload)
                    upload.add_done_callback(finished.put_nowait)

        producer = asyncio.create_task(produce())
        producer.add_done_callback(finished.put_nowait)
        producing = True
        try:
            while producing or uploads:
                task = await finished.get()
                if task is producer:
                    producer.result()  # the provider's error, if it failed
                    producing = False
                    continue
                uploads.discard(task)
                stored: Stored = task.result()  # the storage error, if it failed
                delivered += 1
                yield stored
        finally:
            # On any way out (done, a failure, the caller closing or cancelling the stream), stop what still
            # runs and wait for it, so no provider call or upload outlives the attempt.
            producer.cancel()
            for upload in uploads:
                upload.cancel()
            await asyncio.gather(producer, *uploads, return_exceptions=True)
            holdings.release()

        reasons = [f.reason for f in sorted(filtered, key=lambda f: f.index)]
        if delivered == 0:
            if filtered:
                raise generation_error(
                    ErrorKind.FAILED_PRECONDITION,
                    "ALL_IMAGES_FILTERED",
                    "every image was withheld by the provider's safety filters: " + "; ".join(reasons),
                    retryable=False,
                )
            raise generation_error(
                ErrorKind.FAILED_PRECONDITION, "NO_IMAGES", "the provider returned no images", retryable=False
            )
        log.info(
            "generation completed",
            job_id=request.job_id,
            attempt=request.attempt,
            delivered=delivered,
            filtered=len(filtered),
        )
        yield Completed(delivered, len(filtered), reasons)
