"""JobService wiring: settings in, running service out. The one place its parts are built."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import uuid
from dataclasses import dataclass, field

import asyncpg
import httpx
import structlog
from google.protobuf import json_format
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from imagegen_common.dev_tokens import DEV_JWT_SECRET
from imagegen_common.embedded_postgres import EmbeddedPostgres
from imagegen_common.grpc_server import RunningServer, TlsFiles, start_server
from imagegen_common.lifecycle import on_close, run_until_signalled
from imagegen_common.metrics import MetricsServer, Refresher, RpcMetrics
from imagegen_common.migrate import migrate
from imagegen_common.rpc_observability import OutgoingCalls, ServerObservability
from imagegen_common.transport import check_client, check_listener, is_loopback_host, target_is_local
from job_service.auth import JwksKeys, ServiceApiKeys, TokenVerifier
from job_service.cleanup import CleanupStore, Sweeper, SweeperConfig
from job_service.config import ConfigurationError, JobSettings
from job_service.dispatcher import Dispatcher, DispatcherConfig
from job_service.domain import Job
from job_service.fanout import EventFanout
from job_service.generator_client import GeneratorClient
from job_service.input_budget import InputImageBudget
from job_service.jobs import JobManager, JobPolicy
from job_service.metrics import InstrumentedJobStore, JobMetrics, WebhookMetrics
from job_service.notifications import JobNotifications
from job_service.page_tokens import PageTokens, derive_key
from job_service.retention import RetentionConfig, RetentionStore, RetentionSweeper
from job_service.servicer import JobServicer, job_to_pb
from job_service.store import CONNECTION_ERRORS, create_pool
from job_service.watch_limits import WatchStreams
from job_service.webhook_sender import SenderConfig, WebhookSender
from job_service.webhook_store import WebhookStore
from job_service.webhooks import RetrySchedule, Signer, WebhookPolicy

log = structlog.get_logger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JobService"].full_name


def resolve_database_url(settings: JobSettings) -> tuple[str, EmbeddedPostgres | None]:
    """DATABASE_URL when set; otherwise the embedded server under data_dir (started if needed)."""
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.data_dir / "postgres")
    return embedded.url(), embedded


def exposed_listeners(settings: JobSettings) -> list[str]:
    """Every listener bound beyond loopback, as the setting that binds it (the gRPC and the metrics one)."""
    exposed = []
    if not is_loopback_host(settings.host):
        exposed.append(f"JOB_HOST={settings.host}")
    if settings.metrics_port and not is_loopback_host(settings.metrics_host):
        exposed.append(f"JOB_METRICS_HOST={settings.metrics_host}")
    return exposed


def check_jwt_secret(settings: JobSettings) -> None:
    """Refuses the public development secret anywhere but a service only this machine can reach.

    Anyone can mint tokens with it, a `role: service_role` one included (every job, any credit grant).
    """
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    if secret != DEV_JWT_SECRET:
        return
    if settings.supabase_url and "jwt_secret" not in settings.model_fields_set:
        # A real project left on the default (public) development secret.
        raise ConfigurationError(
            "SUPABASE_URL is set but SUPABASE_JWT_SECRET is the public development secret; set it to the "
            "project's JWT secret, or to an empty value to accept only JWKS-signed (ES256/RS256) tokens"
        )
    exposed = exposed_listeners(settings)
    if exposed:
        raise ConfigurationError(
            f"SUPABASE_JWT_SECRET is the public development secret, with which anyone can mint a service_role "
            f"token, and this service listens beyond loopback ({', '.join(exposed)}); set SUPABASE_JWT_SECRET to a "
            "secret of your own (e.g. `openssl rand -base64 48`; the project's JWT secret with Supabase), or to an "
            "empty value with SUPABASE_URL to accept only JWKS-signed tokens, or bind to 127.0.0.1"
        )


def build_verifier(settings: JobSettings, http: httpx.AsyncClient) -> TokenVerifier:
    jwks = None
    issuer = settings.jwt_issuer
    if settings.supabase_url:
        base = settings.supabase_url.rstrip("/")
        try:
            jwks = JwksKeys(
                f"{base}/auth/v1/.well-known/jwks.json",
                http,
                max_age_seconds=settings.jwks_max_age_seconds,
                min_refetch_seconds=settings.jwks_min_refetch_seconds,
                max_stale_seconds=settings.jwks_max_stale_seconds,
            )
        except ValueError as exc:
            raise ConfigurationError(f"JOB_JWKS_MAX_STALE_SECONDS: {exc}") from None
        issuer = issuer or f"{base}/auth/v1"
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    check_jwt_secret(settings)
    if secret == DEV_JWT_SECRET:
        log.warning(
            "accepting tokens signed with the local development secret; set SUPABASE_JWT_SECRET or "
            "SUPABASE_URL outside local development"
        )
    try:
        api_keys = ServiceApiKeys([key.get_secret_value() for key in settings.service_api_keys])
    except ValueError as exc:
        raise ConfigurationError(f"JOB_SERVICE_API_KEYS: {exc}") from None
    return TokenVerifier(
        api_keys=api_keys,
        hs256_secret=secret or None,
        jwks=jwks,
        audience=settings.jwt_audience,
        issuer=issuer,
        leeway_seconds=settings.jwt_leeway_seconds,
        allow_anonymous=settings.allow_anonymous_users,
    )


def build_webhook_sender(
    settings: JobSettings, store: WebhookStore, owner: str, metrics: WebhookMetrics
) -> WebhookSender | None:
    """The replica's webhook sender, or None when no secret is configured (webhooks off)."""
    if not settings.webhook_secrets:
        return None
    try:
        signer = Signer([secret.get_secret_value() for secret in settings.webhook_secrets])
    except ValueError as exc:
        raise ConfigurationError(f"JOB_WEBHOOK_SECRETS: {exc}") from None
    if settings.webhook_allow_private:
        log.warning("JOB_WEBHOOK_ALLOW_PRIVATE is on: webhooks may reach loopback and private addresses")

    def render(job: Job) -> dict[str, object]:
        # The job exactly as GetJob returns it, in protobuf's JSON mapping.
        return json_format.MessageToDict(job_to_pb(job))

    return WebhookSender(
        store,
        signer,
        render,
        SenderConfig(
            owner=owner,
            concurrency=settings.webhook_concurrency,
            timeout_seconds=settings.webhook_timeout_seconds,
            poll_interval=max(settings.poll_interval_seconds, 0.1),
            schedule=RetrySchedule(
                settings.webhook_retry_base_seconds,
                settings.webhook_retry_max_seconds,
                settings.webhook_retry_for_seconds,
            ),
            policy=webhook_policy(settings),
        ),
        metrics,
    )


def webhook_policy(settings: JobSettings) -> WebhookPolicy:
    return WebhookPolicy(allow_http=settings.webhook_allow_http, allow_private=settings.webhook_allow_private)


def page_tokens(settings: JobSettings) -> PageTokens:
    """Page tokens signed with a key every replica derives alike (see JobSettings.page_token_secret)."""
    for secret in (settings.page_token_secret, settings.jwt_secret):
        if secret is not None and secret.get_secret_value():
            return PageTokens(derive_key(secret.get_secret_value()))
    log.warning(
        "no JOB_PAGE_TOKEN_SECRET or SUPABASE_JWT_SECRET: ListJobs page tokens are signed with a key of this "
        "process only, so a token works only on the replica that made it"
    )
    return PageTokens(secrets.token_bytes(32))


class HealthReporter:
    """grpc.health.v1 for JobService: SERVING while its database is reachable and it is not shutting down.

    The LISTEN connection stands for the database: it is always open, probed every few seconds and
    reconnected with backoff, so its state is known without extra queries.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._database_up = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def database_reachable(self, up: bool) -> None:
        self._database_up = up
        self._changed.set()

    def start(self, running: RunningServer) -> None:
        self._changed.set()
        self._task = asyncio.create_task(self._report(running), name="health")

    async def stop(self, running: RunningServer) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await running.set_serving(False)

    async def _report(self, running: RunningServer) -> None:
        reported: bool | None = None
        while True:
            await self._changed.wait()
            self._changed.clear()
            serving = self._database_up and not self._stopping
            if serving != reported:
                await running.set_serving(serving)
                reported = serving
                if serving:
                    log.info("health: SERVING")
                else:
                    log.warning("health: NOT_SERVING (database unreachable)")


def check_transport(settings: JobSettings) -> None:
    """Refuses, before anything starts, plaintext gRPC beyond this machine that was not asked for."""
    if (settings.generator_tls_cert or settings.generator_tls_key) and not settings.generator_tls_ca:
        raise ValueError("JOB_GENERATOR_TLS_CERT/KEY need JOB_GENERATOR_TLS_CA (else the hop would be plaintext)")
    tls = bool(settings.tls_cert and settings.tls_key)
    check_listener(settings.host, tls, settings.allow_plaintext, "JOB_ALLOW_PLAINTEXT")
    generator_tls = settings.generator_tls_ca is not None
    check_client(settings.generator_target, generator_tls, settings.allow_plaintext, "JOB_ALLOW_PLAINTEXT")
    remote = not target_is_local(settings.generator_target)
    if remote and not (settings.generator_token or settings.generator_tls_cert):
        log.warning("calls to the generator carry no credentials (set JOB_GENERATOR_TOKEN or mutual TLS)")


@dataclass
class JobApp:
    settings: JobSettings
    running: RunningServer
    dispatcher: Dispatcher
    notifications: JobNotifications
    pool: asyncpg.Pool
    generator: GeneratorClient
    http: httpx.AsyncClient
    embedded: EmbeddedPostgres | None
    owner: str
    health: HealthReporter | None = None
    registry: CollectorRegistry | None = None
    metrics: MetricsServer | None = None
    servicer: JobServicer | None = None
    watch_streams: WatchStreams | None = None
    input_budget: InputImageBudget | None = None
    sweeper: Sweeper | None = None
    retention: RetentionSweeper | None = None
    webhooks: WebhookSender | None = None
    # What start opened, in order: unwinding it is the stop (see start).
    opened: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def port(self) -> int:
        return self.running.port

    async def stop(self) -> None:
        """The system's `beforeunload`: NOT_SERVING, stop claiming, finish or hand back, close."""
        await self.opened.aclose()


async def stop_serving(
    settings: JobSettings,
    running: RunningServer,
    health: HealthReporter,
    dispatcher: Dispatcher,
    sweeper: Sweeper,
    retention: RetentionSweeper,
) -> None:
    """NOT_SERVING, then at once: no new RPCs (those under way finish within 5 s at most), no new claims (running
    attempts finish within the grace, the rest are handed back), the sweeps under way finish."""
    grace = settings.shutdown_grace_seconds
    log.info("shutting down", grace_seconds=grace, in_flight=dispatcher.in_flight)
    await health.stop(running)
    await asyncio.gather(dispatcher.drain(grace), running.stop(min(grace, 5.0)), sweeper.stop(), retention.stop())


async def connect_database(settings: JobSettings, dsn: str) -> asyncpg.Pool:
    """Migrates (if asked) and opens the pool, waiting with backoff while the database cannot be reached.

    A JobService started before its database (a restart of both, a failover) then comes up by itself
    instead of crash-looping. Only connection errors are waited out: a wrong password or database name
    fails at once.
    """
    delay = 0.5
    while True:
        try:
            if settings.migrate_on_start:
                applied = await migrate(dsn)
                if applied:
                    log.info("migrations applied", names=applied)
            return await create_pool(
                dsn,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                statement_cache_size=settings.db_statement_cache_size,
            )
        except CONNECTION_ERRORS as exc:
            log.warning(
                "database unreachable at start; waiting for it",
                error=str(exc) or type(exc).__name__,
                retry_in_seconds=delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class DatabaseUnreachable(RuntimeError):
    """The database did not accept a connection within the wait `job_service migrate` allows."""


async def migrate_when_reachable(dsn: str, wait_seconds: float) -> list[str]:
    """`job_service migrate`: waits with backoff while the database cannot be reached, but only so long.

    A one-shot step started together with its database (compose, a Kubernetes Job) would otherwise fail on its
    first refused connection and stay failed; a bound keeps a wrong address from hanging the deploy for good.
    As in connect_database, only connection errors are waited out: a wrong password fails at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    delay = 0.5
    while True:
        try:
            return await migrate(dsn)
        except CONNECTION_ERRORS as exc:
            error = str(exc) or type(exc).__name__
            left = deadline - loop.time()
            if left <= 0:
                raise DatabaseUnreachable(f"database not reachable within {wait_seconds:g} s: {error}") from exc
            log.warning("database unreachable; waiting for it", error=error, retry_in_seconds=min(delay, left))
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)


def job_policy(settings: JobSettings, *, webhooks_on: bool) -> JobPolicy:
    return JobPolicy(
        default_model=settings.default_model,
        max_prompt_chars=settings.max_prompt_chars,
        active_jobs_per_user=settings.active_jobs_per_user,
        max_attempts=settings.max_attempts,
        default_price_per_image=settings.default_price_per_image,
        model_prices=settings.model_prices,
        new_user_credits=settings.new_user_credits,
        anonymous_user_credits=settings.anonymous_user_credits,
        webhooks=webhook_policy(settings) if webhooks_on else None,
        priority_default=settings.priority_default,
        priority_max=settings.priority_max,
        premium_priority_default=settings.premium_priority_default,
        premium_priority_max=settings.premium_priority_max,
        priority_aging_seconds=settings.priority_aging_seconds,
        create_rate_per_user=settings.create_rate_per_user,
        create_rate_premium=settings.create_rate_premium,
        create_rate_service_role=settings.create_rate_service_role,
        create_rate_window_seconds=settings.create_rate_window_seconds,
        max_input_image_bytes=settings.max_input_image_bytes,
        max_input_image_pixels=settings.max_input_image_pixels,
    )


def build_generator_client(
    settings: JobSettings, store: InstrumentedJobStore, rpc_metrics: RpcMetrics
) -> GeneratorClient:
    return GeneratorClient(
        settings.generator_target,
        token=settings.generator_token.get_secret_value() if settings.generator_token else None,
        tls_ca=settings.generator_tls_ca,
        tls_cert=settings.generator_tls_cert,
        tls_key=settings.generator_tls_key,
        min_streams=settings.generator_streams,
        stream_max_age_seconds=settings.generator_stream_max_age_seconds,
        calls=OutgoingCalls(rpc_metrics),
        input_blobs=store.input_blobs,
    )


def build_dispatcher(
    settings: JobSettings, store: InstrumentedJobStore, generator: GeneratorClient, owner: str
) -> Dispatcher:
    return Dispatcher(
        store,
        generator,
        DispatcherConfig(
            owner=owner,
            max_in_flight=settings.max_in_flight,
            poll_interval=settings.poll_interval_seconds,
            lease_seconds=settings.lease_seconds,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            expiry_interval=settings.expiry_sweep_seconds,
        ),
    )


def build_sweepers(
    settings: JobSettings, pool: asyncpg.Pool, cleanups: CleanupStore, generator: GeneratorClient, metrics: JobMetrics
) -> tuple[Sweeper, RetentionSweeper, RetentionStore]:
    """The storage sweeper, and the retention sweeper that wakes it when it queued objects (and its store)."""
    sweeper = Sweeper(
        cleanups,
        generator,
        SweeperConfig(
            delay_seconds=settings.cleanup_delay_seconds,
            interval_seconds=settings.cleanup_interval_seconds,
            batch_size=settings.cleanup_batch_size,
            call_timeout_seconds=settings.cleanup_call_timeout_seconds,
            backoff_base_seconds=settings.cleanup_backoff_base_seconds,
            backoff_max_seconds=settings.cleanup_backoff_max_seconds,
        ),
        metrics,
    )
    retention_store = RetentionStore(pool)
    retention = RetentionSweeper(
        retention_store,
        RetentionConfig(
            image_retention_days=settings.image_retention_days,
            job_retention_days=settings.job_retention_days,
            interval_seconds=settings.retention_interval_seconds,
            batch_size=settings.retention_batch_size,
        ),
        metrics,
        queued=sweeper.wake,
    )
    return sweeper, retention, retention_store


async def start_metrics(
    settings: JobSettings, registry: CollectorRegistry, refreshers: list[Refresher]
) -> MetricsServer | None:
    if not settings.metrics_port:
        return None
    metrics = await MetricsServer(registry, settings.metrics_host, settings.metrics_port, refreshers=refreshers).start()
    log.info("metrics serving", url=f"http://{settings.metrics_host}:{metrics.port}/metrics")
    return metrics


async def start(settings: JobSettings) -> JobApp:
    """Builds and starts every part. Each is registered on one exit stack as soon as it is open, so that
    unwinding the stack is the stop, in reverse: stop serving and drain (while the LISTEN connection, the
    generator and the pool are still there), then the LISTEN connection, the webhook sender, the generator
    channel, the HTTP client, the metrics listener, the pool and the embedded database. If a step fails, the
    stack is unwound before the error propagates: a failed start leaves no connection, task or port behind.
    """
    # Both before anything starts, so a refused configuration leaves nothing running.
    check_transport(settings)
    check_jwt_secret(settings)
    async with contextlib.AsyncExitStack() as opened:
        app = await _start(settings, opened)
        app.opened = opened.pop_all()
        return app


async def _start(settings: JobSettings, opened: contextlib.AsyncExitStack) -> JobApp:
    dsn, embedded = resolve_database_url(settings)
    if embedded is not None:
        on_close(opened, embedded.stop)
    pool = await connect_database(settings, dsn)
    on_close(opened, pool.close)
    # One registry per app: several apps (tests) can live in one process.
    registry = CollectorRegistry()
    rpc_metrics = RpcMetrics.create(registry)
    job_metrics = JobMetrics(registry)
    webhook_metrics = WebhookMetrics(registry)
    cleanups = CleanupStore(pool)
    webhook_store = WebhookStore(pool)
    # Up from here to the end of the stop (but for the pool), so a scrape sees the drain.
    metrics = await start_metrics(
        settings,
        registry,
        [
            lambda: job_metrics.refresh_queue(pool),
            lambda: job_metrics.refresh_cleanups(cleanups),
            lambda: webhook_metrics.refresh_queue(webhook_store),
        ],
    )
    if metrics is not None:
        on_close(opened, metrics.stop)
    http = httpx.AsyncClient()
    on_close(opened, http.aclose)
    fanout = EventFanout()
    store = InstrumentedJobStore(pool, job_metrics, fanout)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    generator = build_generator_client(settings, store, rpc_metrics)
    on_close(opened, generator.close)
    dispatcher = build_dispatcher(settings, store, generator, owner)
    job_metrics.in_flight.set_function(lambda: dispatcher.in_flight)
    health = HealthReporter()
    webhooks = build_webhook_sender(settings, webhook_store, owner, webhook_metrics)
    if webhooks is not None:
        # Its HTTP client is open already; stopping it also hands back the deliveries it was sending.
        on_close(opened, webhooks.stop)
    notifications = JobNotifications(
        dsn, store, writes=fanout, on_event=fanout.notified, on_connection_change=health.database_reachable
    )
    fanout.deliver_to(watchers=notifications, runner=dispatcher, webhooks=webhooks)
    await notifications.start()
    on_close(opened, notifications.stop)
    with contextlib.suppress(TimeoutError):  # if not yet, health says NOT_SERVING until it is
        await asyncio.wait_for(notifications.connected.wait(), timeout=10.0)
    sweeper, retention, retention_store = build_sweepers(settings, pool, cleanups, generator, job_metrics)

    def deletion_queued() -> None:
        # DeleteJob queued objects (or will once its job has ended): sweep them, then remove the row, soon.
        sweeper.wake()
        retention.wake()

    jobs = JobManager(
        store,
        generator,
        notifications,
        job_policy(settings, webhooks_on=webhooks is not None),
        page_tokens(settings),
        retention_store,
        dispatcher=dispatcher,
        deletion_queued=deletion_queued,
        webhooks=webhook_store,
    )
    watch_streams = WatchStreams(settings.watch_streams_per_user, settings.watch_streams_per_connection)
    input_budget = InputImageBudget(settings.input_image_budget_mb * 1024 * 1024)
    servicer = JobServicer(jobs, build_verifier(settings, http), watch_streams, input_budget)
    tls = (
        TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        if settings.tls_cert and settings.tls_key
        else None
    )
    running = await start_server(
        add_servicers=[lambda server: pb_grpc.add_JobServiceServicer_to_server(servicer, server)],
        service_names=[SERVICE_NAME],
        host=settings.host,
        port=settings.port,
        tls=tls,
        interceptors=[ServerObservability(rpc_metrics)],
        options=[("grpc.max_receive_message_length", settings.max_request_mb * 1024 * 1024)],
    )
    # The first step of the stop: it stops whichever of these has started (none can fail to).
    on_close(opened, lambda: stop_serving(settings, running, health, dispatcher, sweeper, retention))
    health.start(running)
    dispatcher.start()
    sweeper.start()
    retention.start()
    if webhooks is not None:
        webhooks.start()
    log.info(
        "job service serving",
        port=running.port,
        worker=owner,
        generator=settings.generator_target,
        database="embedded" if embedded else "DATABASE_URL",
    )
    app = JobApp(settings, running, dispatcher, notifications, pool, generator, http, embedded, owner, health)
    app.registry, app.metrics, app.servicer, app.watch_streams = registry, metrics, servicer, watch_streams
    app.input_budget = input_budget
    app.sweeper, app.retention = sweeper, retention
    app.webhooks = webhooks
    return app


async def serve(settings: JobSettings) -> None:
    app = await start(settings)
    await run_until_signalled(app.stop, settings.loop_lag_file)
