"""One attempt at one job: validate, call the provider, store each image as it arrives, report events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import replace
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
    InputImage,
    Started,
    Stored,
    generation_error,
    id_violations,
    invalid_request,
)
from generator_service.providers.base import Provider
from generator_service.providers.memory import AttemptHoldings
from generator_service.storage.base import Storage
from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError

log = structlog.get_logger(__name__)


MAX_SEED = 2_147_483_647
MAX_NEGATIVE_PROMPT_CHARS = 1_000
INPUT_MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


def parameter_violations(request: GenerationRequest, model: ModelSpec) -> list[FieldViolation]:
    """What the optional parameters ask that the model cannot do; a parameter it does not honour is refused by
    name, never dropped (a request must not silently come back other than asked)."""
    problems = [
        FieldViolation(name, f"{model.id} does not take {name}")
        for name in request.set_parameters()
        if not model.honours(name)
    ]
    refused = {p.field for p in problems}
    people = model.person_generation_options
    if "person_generation" not in refused and request.person_generation and request.person_generation not in people:
        problems.append(FieldViolation("person_generation", f"must be one of {', '.join(people)} for {model.id}"))
    if "seed" not in refused and request.seed is not None:
        if not 1 <= request.seed <= MAX_SEED:
            problems.append(FieldViolation("seed", f"must be 1-{MAX_SEED}"))
        elif request.add_watermark is not False:
            # Imagen makes a seed reproducible only without its SynthID watermark, so it asks for both.
            problems.append(FieldViolation("seed", "needs add_watermark=false (a watermarked image takes no seed)"))
    if "negative_prompt" not in refused and len(request.negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        problems.append(FieldViolation("negative_prompt", f"at most {MAX_NEGATIVE_PROMPT_CHARS} characters"))
    levels = model.safety_settings
    if "safety_setting" not in refused and request.safety_setting and request.safety_setting not in levels:
        problems.append(FieldViolation("safety_setting", f"must be one of {', '.join(levels)}"))
    if "language" not in refused and request.language and request.language not in model.languages:
        problems.append(FieldViolation("language", f"must be one of {', '.join(model.languages)}"))
    if "jpeg_quality" not in refused and request.jpeg_quality:
        if not 1 <= request.jpeg_quality <= 100:
            problems.append(FieldViolation("jpeg_quality", "must be 1-100"))
        elif request.output_mime_type != "image/jpeg":
            problems.append(FieldViolation("jpeg_quality", "only with output_mime_type image/jpeg"))
    if request.input_images:
        if len(request.input_images) > model.max_input_images:
            limit = f"at most {model.max_input_images}" if model.max_input_images else "none"
            problems.append(FieldViolation("input_images", f"{model.id} takes {limit}"))
        for i, image in enumerate(request.input_images):
            if image.mime_type not in INPUT_MIME_TYPES:
                problems.append(FieldViolation(f"input_images[{i}]", f"must be one of {', '.join(INPUT_MIME_TYPES)}"))
            if bool(image.data) == bool(image.storage_path):
                problems.append(FieldViolation(f"input_images[{i}]", "needs exactly one of data and storage_path"))
    return problems


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
        problems.append(
            FieldViolation("aspect_ratio", f"must be one of {', '.join(model.aspect_ratios)} for {model.id}")
        )
    if request.image_size not in model.image_sizes:
        problems.append(FieldViolation("image_size", f"must be one of {', '.join(model.image_sizes)} for {model.id}"))
    if request.output_mime_type not in MIME_EXTENSIONS:
        problems.append(FieldViolation("output_mime_type", f"must be one of {', '.join(MIME_EXTENSIONS)}"))
    problems += parameter_violations(request, model)
    if problems:
        raise invalid_request(problems)


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

    async def _with_stored_inputs(self, request: GenerationRequest) -> GenerationRequest:
        """The request with each input given by storage key read from storage (not sent twice over the wire)."""
        if not any(image.storage_path for image in request.input_images):
            return request
        # The object is read with the generator's own storage rights, so this is the ownership check: the key must
        # lie in the user's own folder, with no segment that could lead out of it.
        folder = self._storage.object_key(f"{request.user_id}/")
        inputs = []
        for i, image in enumerate(request.input_images):
            if image.storage_path:
                path = image.storage_path
                if not path.startswith(folder) or any(p in ("", ".", "..") for p in path.split("/")):
                    raise ServiceError(
                        ErrorKind.INVALID_ARGUMENT,
                        "INVALID_ARGUMENT",
                        f"invalid request: input_images[{i}].storage_path is not one of the user's images",
                        [FieldViolation(f"input_images[{i}].storage_path", "not one of the user's images")],
                        metadata={"retryable": "false"},
                    )
                image = InputImage(await self._storage.read(path), image.mime_type)
            inputs.append(image)
        return replace(request, input_images=tuple(inputs))

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
        request = await self._with_stored_inputs(request)
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
        provider_failure: BaseException | None = None
        try:
            while producing or uploads:
                task = await finished.get()
                if task is producer:
                    producing = False
                    if not task.cancelled() and isinstance(task.exception(), ServiceError):
                        # The provider's error. Images it already made (and were charged for) are stored first,
                        # then the attempt fails with it: a retry then asks only for the images still owed.
                        provider_failure = task.exception()
                        continue
                    producer.result()  # any other failure, at once
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
        if provider_failure is not None:
            raise provider_failure

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
