"""GeneratorService wiring: settings in, running server out. The one place its parts are built."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import structlog
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from generator_service.cleanup import ObjectCleaner
from generator_service.config import ConfigurationError, GeneratorSettings, ModelSpec
from generator_service.generation import Generator
from generator_service.image_server import local_storage_server
from generator_service.interceptors import SharedTokenInterceptor
from generator_service.metrics import GeneratorMetrics, MeteredProvider, MeteredStorage
from generator_service.providers.base import Provider
from generator_service.providers.gemini_image import GeminiImageProvider, VertexGeminiImageProvider
from generator_service.providers.gemini_imagen import GeminiImagenProvider
from generator_service.providers.google_auth import AdcTokenSource, TokenSource
from generator_service.providers.http import ProviderHttp
from generator_service.providers.images import load_image_formats
from generator_service.providers.local import LocalProvider
from generator_service.providers.memory import MemoryBudget
from generator_service.providers.vertex_imagen import VertexImagenProvider, vertex_models_url
from generator_service.retry import RetryPolicy
from generator_service.served_models import served_models
from generator_service.servicer import GeneratorServicer
from generator_service.storage.base import Storage
from generator_service.storage.local import LocalStorage
from generator_service.storage.supabase import SupabaseStorage
from imagegen_common.grpc_server import RunningServer, TlsFiles, start_server
from imagegen_common.lifecycle import on_close, run_until_signalled
from imagegen_common.metrics import MetricsServer, RpcMetrics
from imagegen_common.rpc_observability import ServerObservability
from imagegen_common.transport import check_listener, is_loopback_host

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def provider_retry_policy(settings: GeneratorSettings) -> RetryPolicy:
    return RetryPolicy(
        max_retries=settings.provider_max_retries,
        max_total_seconds=settings.provider_retry_max_total_seconds,
        backoff_initial_seconds=settings.retry_backoff_initial_seconds,
        backoff_max_seconds=settings.retry_backoff_max_seconds,
    )


def build_providers(settings: GeneratorSettings, *, vertex_tokens: TokenSource | None = None) -> dict[str, Provider]:
    """The providers that are configured; a model whose provider is missing is not served.

    Each cloud provider gets its own HTTP client (own pool, own limiters). `vertex_tokens` replaces
    Application Default Credentials (tests, or tokens minted elsewhere).
    """
    providers: dict[str, Provider] = {
        "local": LocalProvider(settings.local_latency_min_seconds, settings.local_latency_max_seconds),
    }

    # One budget for every provider: it bounds the process's memory, whichever provider the answers come from.
    memory = MemoryBudget(settings.provider_memory_budget_mb * 1024 * 1024)

    def http(name: str) -> ProviderHttp:
        return ProviderHttp.create(
            name,
            connect_timeout=settings.provider_connect_timeout_seconds,
            read_timeout=settings.provider_read_timeout_seconds,
            policy=provider_retry_policy(settings),
            memory=memory,
        )

    if settings.vertex_project:
        providers["vertex-imagen"] = VertexImagenProvider(
            http("vertex-imagen"),
            vertex_tokens or AdcTokenSource(),
            project=settings.vertex_project,
            location=settings.vertex_location,
            base_url=settings.vertex_base_url,
            jpeg_quality=settings.jpeg_quality,
            max_image_pixels=settings.max_image_pixels,
        )
        # The Gemini image models on Vertex AI: same project, location and credentials (a token source of its
        # own, so each provider closes what it owns).
        providers["vertex-gemini-image"] = VertexGeminiImageProvider(
            http("vertex-gemini-image"),
            vertex_tokens or AdcTokenSource(),
            models_url=vertex_models_url(settings.vertex_project, settings.vertex_location, settings.vertex_base_url),
            jpeg_quality=settings.jpeg_quality,
            max_image_pixels=settings.max_image_pixels,
        )
    key = settings.gemini_api_key.get_secret_value() if settings.gemini_api_key else ""
    if key:  # an empty GEN_GEMINI_API_KEY= line in .env means "not configured"
        providers["gemini-imagen"] = GeminiImagenProvider(
            http("gemini-imagen"),
            key,
            base_url=settings.gemini_base_url,
            jpeg_quality=settings.jpeg_quality,
            max_image_pixels=settings.max_image_pixels,
        )
        providers["gemini-image"] = GeminiImageProvider(
            http("gemini-image"),
            key,
            base_url=settings.gemini_base_url,
            jpeg_quality=settings.jpeg_quality,
            max_image_pixels=settings.max_image_pixels,
        )
    return providers


def build_supabase_storage(settings: GeneratorSettings) -> SupabaseStorage:
    key = settings.supabase_service_key.get_secret_value() if settings.supabase_service_key else ""
    if not settings.supabase_url or not key:
        raise ValueError("GEN_STORAGE_BACKEND=supabase needs GEN_SUPABASE_URL and GEN_SUPABASE_SERVICE_KEY")
    return SupabaseStorage.create(
        settings.supabase_url,
        key,
        settings.storage_bucket,
        policy=RetryPolicy(
            max_retries=settings.storage_max_retries,
            max_total_seconds=settings.storage_retry_max_total_seconds,
            backoff_initial_seconds=settings.retry_backoff_initial_seconds,
            backoff_max_seconds=settings.retry_backoff_max_seconds,
        ),
        timeout_seconds=settings.storage_timeout_seconds,
        prefix=settings.storage_prefix,
        public=settings.storage_public,
        signed_url_ttl_seconds=settings.storage_signed_url_ttl_seconds,
    )


@dataclass
class GeneratorApp:
    settings: GeneratorSettings
    running: RunningServer
    registry: CollectorRegistry | None = None
    metrics: MetricsServer | None = None
    servicer: GeneratorServicer | None = None
    # What start opened, in order: unwinding it is the stop (see start).
    opened: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self) -> None:
        await self.opened.aclose()


async def stop_serving(settings: GeneratorSettings, running: RunningServer, servicer: GeneratorServicer) -> None:
    """Refuses new attempts, then lets the streams in flight finish within the grace."""
    log.info("shutting down", grace_seconds=settings.shutdown_grace_seconds)
    servicer.drain()
    await running.stop(settings.shutdown_grace_seconds)


def check_callers_authenticated(settings: GeneratorSettings) -> None:
    """A generator reachable beyond loopback must authenticate its callers, unless told otherwise."""
    if is_loopback_host(settings.host):
        return
    token = settings.auth_token.get_secret_value() if settings.auth_token else ""
    mutual_tls = bool(settings.tls_cert and settings.tls_key and settings.tls_client_ca)
    if token or mutual_tls:
        return
    if settings.allow_unauthenticated:
        log.warning("serving unauthenticated callers beyond loopback (GEN_ALLOW_UNAUTHENTICATED=true)")
        return
    raise ConfigurationError(
        f"GEN_HOST={settings.host} is reachable beyond loopback but callers are not authenticated: anyone who "
        "can reach it could generate (at the provider's price) and store images under any user; set "
        "GEN_AUTH_TOKEN (and JOB_GENERATOR_TOKEN to the same value), or mutual TLS (GEN_TLS_CERT, GEN_TLS_KEY "
        "and GEN_TLS_CLIENT_CA), or GEN_ALLOW_UNAUTHENTICATED=true if something in front authenticates them"
    )


async def start(settings: GeneratorSettings) -> GeneratorApp:
    """Builds and starts everything. Each part is registered on one exit stack as soon as it is open, so that
    unwinding the stack is the stop, in reverse: stop serving (drain the streams within the grace), then the
    providers, the storage, the storage HTTP server and the metrics listener. If a step fails (a port in use,
    unreadable TLS files, a bucket that does not match...), the stack is unwound before the error propagates,
    so a failed start leaves no thread, port or client behind."""
    tls_configured = bool(settings.tls_cert and settings.tls_key)
    try:
        check_listener(settings.host, tls_configured, settings.allow_plaintext, "GEN_ALLOW_PLAINTEXT")
        check_callers_authenticated(settings)
        async with contextlib.AsyncExitStack() as opened:
            app = await _start(settings, opened)
            app.opened = opened.pop_all()
            return app
    except ConfigurationError as error:
        log.error("refusing to start", reason=str(error))
        raise


async def open_storage(
    settings: GeneratorSettings, metrics: GeneratorMetrics, opened: contextlib.AsyncExitStack
) -> Storage:
    """The configured storage (and, for local storage, the HTTP server of its images), its bucket checked."""
    storage: Storage
    if settings.storage_backend == "local":
        http = local_storage_server(settings)
        http.start()
        on_close(opened, http.stop)
        base = settings.storage_public_base_url or f"http://{settings.storage_http_host}:{http.port}"
        storage = LocalStorage(settings.storage_dir, settings.storage_bucket, base, settings.storage_prefix)
        on_close(opened, storage.aclose)
    else:
        supabase = build_supabase_storage(settings)
        on_close(opened, supabase.aclose)
        await supabase.check_bucket()
        storage = supabase
    return MeteredStorage(storage, settings.storage_backend, metrics)


async def _start(settings: GeneratorSettings, opened: contextlib.AsyncExitStack) -> GeneratorApp:
    # One registry per app: several apps (tests) can live in one process.
    registry = CollectorRegistry()
    rpc_metrics = RpcMetrics.create(registry)
    metrics = GeneratorMetrics(registry)
    # First up and last down, so a scrape sees the drain.
    metrics_server = None
    if settings.metrics_port:
        metrics_server = await MetricsServer(registry, settings.metrics_host, settings.metrics_port).start()
        on_close(opened, metrics_server.stop)
        log.info("metrics serving", url=f"http://{settings.metrics_host}:{metrics_server.port}/metrics")
    storage = await open_storage(settings, metrics, opened)
    providers: dict[str, Provider] = {}
    for name, provider in build_providers(settings).items():
        providers[name] = MeteredProvider(provider, metrics)
        on_close(opened, providers[name].aclose)
    models: dict[str, ModelSpec] = served_models(settings.models, providers, settings.vertex_location)
    generator = Generator(models, providers, storage)
    load_image_formats()

    tls = (
        TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert and settings.tls_key
        else None
    )
    served = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    observability = ServerObservability(rpc_metrics, trust_request_user_id=True, services=served)
    servicer = GeneratorServicer(generator, observability, ObjectCleaner(storage))
    metrics.generate_streams.set_function(servicer.open_streams)
    interceptors: list[Any] = [observability]
    if settings.auth_token:
        interceptors.append(SharedTokenInterceptor(settings.auth_token.get_secret_value()))
    running = await start_server(
        add_servicers=[lambda server: pb_grpc.add_GeneratorServiceServicer_to_server(servicer, server)],
        service_names=[SERVICE_NAME],
        host=settings.host,
        port=settings.port,
        tls=tls,
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", settings.max_request_mb * 1024 * 1024)],
    )
    on_close(opened, lambda: stop_serving(settings, running, servicer))
    log.info("generator serving", port=running.port, models=sorted(models), storage=settings.storage_backend)
    return GeneratorApp(settings, running, registry, metrics_server, servicer)


async def serve(settings: GeneratorSettings) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight streams within the grace period."""
    app = await start(settings)
    await run_until_signalled(app.stop, settings.loop_lag_file)
