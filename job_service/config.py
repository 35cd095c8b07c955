"""JobService settings: one class, read from the environment (prefix JOB_, a few shared names) and .env."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen_common.dev_tokens import DEV_JWT_SECRET
from imagegen_common.logs import LogFormat


class ConfigurationError(RuntimeError):
    """Settings that must not run together; the service refuses to start and says why."""


class JobSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOB_", env_file=".env", extra="ignore", populate_by_name=True)

    # Loopback by default: plaintext is then allowed (local development). Listening on other interfaces
    # needs TLS (tls_cert/tls_key) or allow_plaintext=true; see docs/security.md.
    host: str = "127.0.0.1"
    port: int = 50051

    # PostgreSQL. Unset: an embedded server (pgserver) with its data under data_dir/postgres.
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "JOB_DATABASE_URL"))
    data_dir: Path = Field(default=Path(".data"), validation_alias=AliasChoices("IMAGEGEN_DATA_DIR", "JOB_DATA_DIR"))
    db_pool_min: int = 2
    db_pool_max: int = 10
    # 0 for PgBouncer / Supabase's transaction-mode pooler, which cannot keep prepared statements.
    db_statement_cache_size: int = 100
    migrate_on_start: bool = True
    # `python -m job_service migrate` waits this long for the database to accept connections (a one-shot step
    # started with it, as compose and Kubernetes start it), then exits 1 with the reason.
    migrate_wait_seconds: float = Field(default=60.0, ge=0)

    # Auth (Supabase JWTs). The default secret is the local development one (see dev_tokens); set a
    # real secret, or SUPABASE_URL for JWKS, anywhere else. The service warns when it runs with it, and refuses
    # to start with it when SUPABASE_URL is set or any listener (host, metrics_host) is beyond loopback.
    jwt_secret: SecretStr | None = Field(
        default=SecretStr(DEV_JWT_SECRET),
        validation_alias=AliasChoices("SUPABASE_JWT_SECRET", "JOB_JWT_SECRET"),
    )
    supabase_url: str | None = Field(default=None, validation_alias=AliasChoices("SUPABASE_URL", "JOB_SUPABASE_URL"))
    jwt_audience: str = "authenticated"
    # Default: {SUPABASE_URL}/auth/v1 when SUPABASE_URL is set, otherwise not checked.
    jwt_issuer: str | None = None
    jwt_leeway_seconds: int = 30
    allow_anonymous_users: bool = True
    # The JWKS ({SUPABASE_URL}/auth/v1/.well-known/jwks.json) is refetched after this long, so a revoked
    # key stops working within it (Supabase's own edge cache holds the document 10 minutes) ...
    jwks_max_age_seconds: float = 600.0
    # ... and at once for a token naming an unknown kid (a rotation), but at most once per this interval,
    # so tokens with made-up kids cannot turn the service into a JWKS request flood.
    jwks_min_refetch_seconds: float = 30.0
    # While JWKS fetches fail, the keys in hand stay trusted this long after the last successful fetch, then
    # tokens signed with them are refused (UNAVAILABLE, JWKS_UNAVAILABLE) until a fetch succeeds: a key the project
    # revoked meanwhile must not stay accepted for ever. At least jwks_max_age_seconds.
    jwks_max_stale_seconds: float = 3600.0
    # Supabase secret API keys (sb_secret_...) accepted as the service role, sent as `apikey` metadata (or as
    # `authorization: Bearer sb_secret_...`), for projects without a legacy service_role JWT. A JSON list; never
    # logged, compared in constant time.
    service_api_keys: list[SecretStr] = Field(default_factory=list)

    # The key that signs ListJobs page tokens is derived from this secret, and from the JWT secret when this is
    # unset; every replica must have the same one, or a page token made by one is refused by another. With
    # neither set (JWKS-only auth), each process picks a random key: tokens then work only on their replica.
    page_token_secret: SecretStr | None = None

    # GeneratorService.
    generator_target: str = "localhost:50052"
    generator_token: SecretStr | None = None
    generator_tls_ca: Path | None = None
    generator_tls_cert: Path | None = None
    generator_tls_key: Path | None = None
    # Attempts travel many to a GenerateMany stream: at least this many are kept open, spread round-robin over
    # the generator's replicas (so at least the number of replicas), more as they fill up ...
    generator_streams: int = Field(default=8, ge=1)
    # ... and each takes no new attempt after this long, so a replica that joins gets its share.
    generator_stream_max_age_seconds: float = Field(default=60.0, gt=0)

    # Jobs.
    default_model: str = "local"
    max_prompt_chars: int = 2000
    active_jobs_per_user: int = 4
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 120.0

    # Priorities, 0 (lowest) to 9 (highest). A job created without one gets priority_default (a premium account's,
    # premium_priority_default); a user may ask for at most priority_max (premium: premium_priority_max), the service
    # role for any. Above the account's maximum: INVALID_ARGUMENT.
    priority_default: int = Field(default=5, ge=0, le=9)
    priority_max: int = Field(default=5, ge=0, le=9)
    premium_priority_default: int = Field(default=5, ge=0, le=9)
    premium_priority_max: int = Field(default=7, ge=0, le=9)
    # Aging: a waiting job gains one step of priority per this many seconds, so a job of priority p is never passed
    # by a job created more than (9 - p) * priority_aging_seconds after it. Applies to jobs created from then on.
    priority_aging_seconds: float = Field(default=60.0, gt=0)
    # Expiry of jobs not started before their start deadline (start_within): every replica sweeps this often.
    expiry_sweep_seconds: float = Field(default=1.0, gt=0)

    # CreateJob rate limits: jobs one user may create per create_rate_window_seconds (a sliding window counted in
    # the database, so across replicas), for users, premium users and the service role acting for a user. 0: no
    # limit. Past it: RESOURCE_EXHAUSTED (RATE_LIMITED) with RetryInfo.
    create_rate_per_user: int = Field(default=0, ge=0)
    create_rate_premium: int = Field(default=0, ge=0)
    create_rate_service_role: int = Field(default=0, ge=0)
    create_rate_window_seconds: float = Field(default=60.0, gt=0, le=86_400)

    # Credits: price per delivered image, per model; models not listed cost default_price_per_image.
    default_price_per_image: int = 1
    model_prices: dict[str, int] = Field(default_factory=dict)
    # Credits granted the first time a user is seen (a ledger grant row records it).
    new_user_credits: int = 100
    # ... and the first time a Supabase anonymous user (is_anonymous) is seen: anyone can sign in anonymously
    # again and again, so anything above 0 is free credits for the asking.
    anonymous_user_credits: int = Field(default=0, ge=0)

    # Input images (CreateJob.input_images): most bytes and pixels (read from the header) of each inline image;
    # Google takes 7 MB per inline image.
    max_input_image_bytes: int = Field(default=7 * 1024 * 1024, ge=1)
    max_input_image_pixels: int = Field(default=25_000_000, ge=1, le=89_478_485)
    # Largest request message the server accepts (gRPC's default is 4 MB, too small for images inline); past it
    # gRPC itself answers RESOURCE_EXHAUSTED. It bounds the memory one call can take before anything else runs.
    max_request_mb: int = Field(default=32, ge=1, le=1024)
    # Inline input image bytes all CreateJob calls in progress may hold together; a call past it is refused with
    # RESOURCE_EXHAUSTED (INPUT_IMAGE_BUDGET_EXHAUSTED) and RetryInfo (job_service/input_budget.py). 0: no limit.
    input_image_budget_mb: int = Field(default=128, ge=0)

    # WatchJob streams one user (service-role callers are not counted per user), and one connection (by peer
    # address: behind a proxy, all of its users), may hold open at once; beyond, RESOURCE_EXHAUSTED. 0: no cap.
    watch_streams_per_user: int = 100
    watch_streams_per_connection: int = 1000

    # Dispatcher.
    max_in_flight: int = 256
    poll_interval_seconds: float = 1.0
    lease_seconds: float = 30.0
    shutdown_grace_seconds: float = 60.0

    # Storage sweeper (docs/durability.md): the objects of attempts that did not deliver are deleted from the
    # bucket once the job has ended. A folder is swept this long after its job ended, so that an attempt still
    # running at a generator for a replica that died or lost its lease has ended first: such an attempt runs at
    # most the 600 s deadline JobService gives every attempt (a replica that died is noticed by the generator
    # within its keepalive, about 40 s), so 15 minutes leaves room to spare.
    cleanup_delay_seconds: float = Field(default=900.0, ge=0)
    # How often each replica looks for folders due (a full batch is followed by the next at once).
    cleanup_interval_seconds: float = Field(default=30.0, gt=0)
    # Folders one look takes (and sweeps concurrently).
    cleanup_batch_size: int = Field(default=16, ge=1, le=1000)
    # Deadline of one DeleteJobObjects call; a folder is leased to its sweeper for this plus 30 s.
    cleanup_call_timeout_seconds: float = Field(default=120.0, gt=0)
    # After a failed sweep the folder waits base * 2^(tries-1) seconds, jittered, at most the cap.
    cleanup_backoff_base_seconds: float = Field(default=30.0, gt=0)
    cleanup_backoff_max_seconds: float = Field(default=3600.0, gt=0)

    # Retention (docs/durability.md): days after a job ended that its images are deleted from storage (the job
    # then shows them as deleted, without URLs), and that the job itself (row and events; never its credit ledger
    # rows) is deleted, after its images. 0 keeps them for ever: the default, so an upgrade deletes nothing anyone
    # did not ask for. Fractions of a day are allowed. Images go at the shorter of the two.
    image_retention_days: float = Field(default=0.0, ge=0, le=36_500)
    job_retention_days: float = Field(default=0.0, ge=0, le=36_500)
    # How often each replica runs a retention pass (the DeleteJob'd jobs' rows go by it too); a pass takes at most
    # this many jobs per step, and a full step is followed by the next pass at once.
    retention_interval_seconds: float = Field(default=60.0, gt=0)
    retention_batch_size: int = Field(default=100, ge=1, le=10_000)
    # Webhooks (docs/webhooks.md). Standard Webhooks secrets (whsec_<base64 of 24-64 bytes>), a JSON list: the
    # first is current, the others are old ones still signing during a rotation (each adds a v1 signature).
    # Empty: CreateJob refuses webhook_url (WEBHOOKS_DISABLED).
    webhook_secrets: list[SecretStr] = Field(default_factory=list)
    # http:// webhook URLs (tests, a private network); otherwise https:// only.
    webhook_allow_http: bool = False
    # Webhooks to loopback, private, link-local and CGNAT addresses (tests only: anyone creating jobs could
    # otherwise make the service POST into its own network). Metadata and multicast addresses stay refused.
    webhook_allow_private: bool = False
    # Sends under way at once per replica, and how long one may take in all (connect, TLS, headers).
    webhook_concurrency: int = Field(default=16, ge=1)
    webhook_timeout_seconds: float = Field(default=15.0, gt=0)
    # Retries: exponential from base to max (jittered, at least a receiver's Retry-After) until this long after
    # the event, then the delivery is given up and recorded as failed.
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_retry_for_seconds: float = Field(default=86400.0, gt=0)

    tls_cert: Path | None = None
    tls_key: Path | None = None
    # With TLS: also require client certificates signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    # Plaintext gRPC, for the listener and for the calls to the generator. Unset: allowed only on loopback
    # (host 127.0.0.1 / a generator on this machine); true: allowed anywhere (a private network, a proxy
    # that terminates TLS); false: never.
    allow_plaintext: bool | None = None
    # Prometheus /metrics on this port (0: off), on metrics_host: loopback unless set (a scraper elsewhere needs
    # e.g. 0.0.0.0, which also makes the development secret refused, as for host).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # When set, event-loop lag (a histogram, see imagegen_common.loop_lag) is written to this file every second.
    loop_lag_file: Path | None = None
    log_format: LogFormat = "console"
    log_level: str = "INFO"
