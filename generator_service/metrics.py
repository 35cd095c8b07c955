"""GeneratorService's metrics: provider latency, errors and images per model; storage upload latency.

The providers and the storage backend are wrapped where they are built (server.py), so neither the
providers nor generation.py know about metrics. Provider latency is per attempt: from the first request to
the provider until its last image is decoded (retries of single HTTP requests included).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from generator_service.config import ModelSpec
from generator_service.domain import FilteredImage, GeneratedImage, GenerationRequest
from generator_service.providers.base import Provider
from generator_service.storage.base import Storage, UploadedObject
from imagegen_common.errors import ServiceError

PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300)
STORAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.provider_seconds = Histogram(
            "imagegen_provider_seconds",
            "Provider time per attempt (first request to last image), by provider, model and outcome.",
            ["provider", "model", "outcome"],
            buckets=PROVIDER_BUCKETS,
            registry=registry,
        )
        self.provider_errors = Counter(
            "imagegen_provider_errors",
            "Attempts that failed at the provider, by provider, model and reason.",
            ["provider", "model", "reason"],
            registry=registry,
        )
        self.images = Counter(
            "imagegen_provider_images",
            "Images the provider answered with, by result (returned, or filtered by its safety filters).",
            ["provider", "model", "result"],
            registry=registry,
        )
        self.storage_seconds = Histogram(
            "imagegen_storage_upload_seconds",
            "Time to store one image (retries included), by outcome.",
            ["backend", "outcome"],
            buckets=STORAGE_BUCKETS,
            registry=registry,
        )
        # Set to read the servicer's count where both are built (server.py).
        self.generate_streams = Gauge(
            "imagegen_generate_streams",
            "GenerateMany streams open (a JobService keeps a few, each carrying many attempts).",
            registry=registry,
        )


class MeteredProvider:
    def __init__(self, inner: Provider, metrics: GeneratorMetrics) -> None:
        self.name = inner.name
        self._inner = inner
        self._metrics = metrics

    async def generate(
        self, request: GenerationRequest, model: ModelSpec
    ) -> AsyncGenerator[GeneratedImage | FilteredImage, None]:
        started = time.perf_counter()
        outcome = "error"
        try:
            # aclosing: closing this generator closes the provider's at once (its pending calls stop).
            async with contextlib.aclosing(self._inner.generate(request, model)) as items:
                async for item in items:
                    result = "filtered" if isinstance(item, FilteredImage) else "returned"
                    self._metrics.images.labels(self.name, model.id, result).inc()
                    yield item
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except ServiceError as exc:
            self._metrics.provider_errors.labels(self.name, model.id, exc.reason).inc()
            raise
        except Exception as exc:
            self._metrics.provider_errors.labels(self.name, model.id, type(exc).__name__).inc()
            raise
        finally:
            self._metrics.provider_seconds.labels(self.name, model.id, outcome).observe(time.perf_counter() - started)

    async def aclose(self) -> None:
        await self._inner.aclose()


class MeteredStorage:
    def __init__(self, inner: Storage, backend: str, metrics: GeneratorMetrics) -> None:
        self._inner = inner
        self._backend = backend
        self._metrics = metrics

    async def upload(self, path: str, data: bytes, content_type: str) -> UploadedObject:
        started = time.perf_counter()
        outcome = "error"
        try:
            uploaded = await self._inner.upload(path, data, content_type)
            outcome = "ok"
            return uploaded
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._metrics.storage_seconds.labels(self._backend, outcome).observe(time.perf_counter() - started)

    # Deletions are JobService's (imagegen_storage_cleanup_* there); timing here is only for the uploads.
    async def list_folder(self, folder: str) -> list[str]:
        return await self._inner.list_folder(folder)

    async def delete(self, keys: list[str]) -> None:
        await self._inner.delete(keys)

    def object_key(self, path: str) -> str:
        return self._inner.object_key(path)

    async def read(self, key: str) -> bytes:
        return await self._inner.read(key)

    async def aclose(self) -> None:
        await self._inner.aclose()
