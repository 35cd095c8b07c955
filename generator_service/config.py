"""GeneratorService settings: one class, read from the environment (prefix GEN_) and .env, built once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen_common.logs import LogFormat

ALL_ASPECT_RATIOS = ["1:1", "3:4", "4:3", "9:16", "16:9"]
PERSON_GENERATION = ["dont_allow", "allow_adult", "allow_all"]


class ModelSpec(BaseModel):
    """A model this generator serves and what it accepts."""

    id: str
    provider: Literal["local", "vertex-imagen", "gemini-imagen", "gemini-image"]
    display_name: str
    aspect_ratios: list[str] = Field(default_factory=lambda: list(ALL_ASPECT_RATIOS))
    image_sizes: list[str] = Field(default_factory=lambda: ["1K"])
    max_sample_count: int = 4
    person_generation_options: list[str] = Field(default_factory=lambda: list(PERSON_GENERATION))
    provider_price_usd: float = 0.0
    # Per-model limits, so a burst queues here instead of failing at the provider.
    max_concurrency: int = 8
    requests_per_minute: int = 0  # 0: no limit


def _default_models() -> list[ModelSpec]:
    return [
        ModelSpec(
            id="local",
            provider="local",
            display_name="Local placeholder renderer (offline, not AI)",
            image_sizes=["1K", "2K"],
            max_concurrency=64,
        ),
        ModelSpec(
            id="imagen-4.0-generate-001",
            provider="vertex-imagen",
            display_name="Imagen 4 (Vertex AI)",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.04,
        ),
        ModelSpec(
            id="imagen-4.0-ultra-generate-001",
            provider="vertex-imagen",
            display_name="Imagen 4 Ultra (Vertex AI)",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.06,
        ),
        ModelSpec(
            id="imagen-4.0-fast-generate-001",
            provider="vertex-imagen",
            display_name="Imagen 4 Fast (Vertex AI)",
            provider_price_usd=0.02,
        ),
        ModelSpec(
            id="gemini-2.5-flash-image",
            provider="gemini-image",
            display_name="Gemini 2.5 Flash Image (Gemini API)",
            provider_price_usd=0.039,
        ),
    ]


class GeneratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GEN_", env_file=".env", extra="ignore", env_nested_delimiter="__")

    host: str = "0.0.0.0"
    port: int = 50052
    # Seconds in-flight Generate streams get to finish after SIGTERM.
    shutdown_grace_seconds: float = 60.0
    # When set, callers must send `authorization: Bearer <token>` (the JobService -> generator hop).
    auth_token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # With TLS: require client certificates signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    log_format: LogFormat = "console"
    log_level: str = "INFO"

    # Models. A model is listed (and served) only when its provider is configured.
    models: list[ModelSpec] = Field(default_factory=_default_models)

    # local provider: seconds each Generate waits before rendering (uniform in [min, max]).
    local_latency_min_seconds: float = 0.0
    local_latency_max_seconds: float = 0.0

    # Storage.
    storage_backend: Literal["local", "supabase"] = "local"
    storage_bucket: str = "images"
    # local storage: files live under this folder and are served over HTTP.
    storage_dir: Path = Path(".data/storage")
    storage_http_host: str = "127.0.0.1"
    storage_http_port: int = 8088  # 0: any free port
    # The base URL that local storage URLs start with; default http://{storage_http_host}:{port}.
    storage_public_base_url: str | None = None
