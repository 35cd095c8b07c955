"""GeneratorService wiring: settings in, running server out. The one place its parts are built."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Any

import structlog

from generator_service.config import GeneratorSettings, ModelSpec
from generator_service.generation import Generator
from generator_service.interceptors import SharedTokenInterceptor
from generator_service.providers.base import Provider
from generator_service.providers.local import LocalProvider
from generator_service.servicer import GeneratorServicer
from generator_service.storage.base import Storage
from generator_service.storage.local import LocalStorage, LocalStorageServer
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc
from imagegen_common.grpc_server import RunningServer, TlsFiles, start_server

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def build_providers(settings: GeneratorSettings) -> dict[str, Provider]:
    """The providers that are configured; a model whose provider is missing is not served."""
    providers: dict[str, Provider] = {
        "local": LocalProvider(settings.local_latency_min_seconds, settings.local_latency_max_seconds),
    }
    return providers


@dataclass
class GeneratorApp:
    settings: GeneratorSettings
    running: RunningServer
    closers: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self) -> None:
        log.info("shutting down", grace_seconds=self.settings.shutdown_grace_seconds)
        await self.running.stop(self.settings.shutdown_grace_seconds)
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result


async def start(settings: GeneratorSettings) -> GeneratorApp:
    closers: list[Any] = []
    storage: Storage
    if settings.storage_backend == "local":
        http = LocalStorageServer(settings.storage_dir, settings.storage_http_host, settings.storage_http_port)
        http.start()
        closers.append(http.stop)
        base = settings.storage_public_base_url or f"http://{settings.storage_http_host}:{http.port}"
        storage = LocalStorage(settings.storage_dir, settings.storage_bucket, base)
    else:
        raise NotImplementedError("storage backend 'supabase' is not built yet (see README: not finished)")
    closers.append(storage.aclose)

    providers = build_providers(settings)
    for provider in providers.values():
        closers.append(provider.aclose)
    models: dict[str, ModelSpec] = {m.id: m for m in settings.models if m.provider in providers}
    generator = Generator(models, providers, storage)

    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert and settings.tls_key else None
    interceptors = [SharedTokenInterceptor(settings.auth_token.get_secret_value())] if settings.auth_token else []
    running = await start_server(
        add_servicers=[lambda server: pb_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(generator), server)],
        service_names=[SERVICE_NAME],
        host=settings.host,
        port=settings.port,
        tls=tls,
        interceptors=interceptors,
    )
    log.info("generator serving", port=running.port, models=sorted(models), storage=settings.storage_backend)
    return GeneratorApp(settings, running, closers)


async def serve(settings: GeneratorSettings) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight streams within the grace period."""
    app = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
