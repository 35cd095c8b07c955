"""GeneratorService settings: one class, read from the environment (prefix GEN_) and .env, built once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen_common.logs import LogFormat

# Imagen 4's aspect ratios (Vertex AI model cards).
ALL_ASPECT_RATIOS = ["1:1", "3:4", "4:3", "9:16", "16:9"]
# The Gemini image models' ratios (Vertex AI model cards for gemini-2.5-flash-image and gemini-3-pro-image-preview).
GEMINI_ASPECT_RATIOS = ["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
# Gemini 3.1 Flash Image adds the extremes.
GEMINI_31_ASPECT_RATIOS = [*GEMINI_ASPECT_RATIOS, "1:4", "4:1", "1:8", "8:1"]
# Gemini 3.1 Flash Image also makes 512 px images: `imageSize` "512" (the Gemini API's discovery document: "Supported
# values are `512`, `1K`, `2K`, `4K`"); no other catalogued Google model does (the local placeholder offers all).
GEMINI_31_IMAGE_SIZES = ["512", "1K", "2K", "4K"]
PERSON_GENERATION = ["dont_allow", "allow_adult", "allow_all"]
# Imagen's safety filter levels (`safetySetting`); BLOCK_NONE needs an allow-listed project and is not offered.
SAFETY_SETTINGS = ["block_low_and_above", "block_medium_and_above", "block_only_high"]
# Imagen's prompt languages (`language`): "auto" detects; the others are Vertex's preview languages.
LANGUAGES = ["auto", "en", "es", "hi", "ja", "ko", "pt", "zh"]

# The optional parameters a model may honour, named as in GenerateRequest / GenerationParams. A request that sets
# one the model does not list is refused (INVALID_ARGUMENT naming model and field), never silently dropped.
PARAMETERS = (
    "person_generation",
    "seed",
    "add_watermark",
    "enhance_prompt",
    "negative_prompt",
    "safety_setting",
    "language",
    "jpeg_quality",
)
_IMAGEN_VERTEX_PARAMETERS = ["seed", "add_watermark", "enhance_prompt", "safety_setting", "language"]
# Honoured by every provider (Imagen's outputOptions; the others encode the JPEG themselves), so never listed in
# `parameters`; person_generation follows person_generation_options.
_ALWAYS_HONOURED = ("jpeg_quality",)

# Where the catalogue's facts come from (docs/generator.md has the table): checked 2026-12-07.
CATALOGUE_CHECKED = "2026-12-07"


class ConfigurationError(RuntimeError):
    """Settings that cannot work (or must not run together); the generator refuses to start and says why."""


class ModelSpec(BaseModel):
    """A model this generator serves and what it accepts: validation, the request builders and ListModels all
    read this one declaration."""

    id: str
    provider: Literal["local", "vertex-imagen", "gemini-imagen", "gemini-image", "vertex-gemini-image"]
    display_name: str
    # The model's name in the provider's API when it differs from `id`: two providers can serve the same
    # Google model (Imagen 4 on Vertex and on the Gemini API), and our catalogue ids must stay unique.
    provider_model: str | None = None
    aspect_ratios: list[str] = Field(default_factory=lambda: list(ALL_ASPECT_RATIOS))
    # Output sizes ("512", "1K", "2K", "4K"). A model with more than one gets the size on the wire for every request
    # (imageConfig.imageSize / sampleImageSize); a model with one gets nothing (its only size is the default,
    # and Imagen 4 Fast refuses sampleImageSize).
    image_sizes: list[str] = Field(default_factory=lambda: ["1K"])
    max_sample_count: int = 4
    # Empty: the model has no person-generation control, and a request that sets one is refused.
    person_generation_options: list[str] = Field(default_factory=lambda: list(PERSON_GENERATION))
    # How many input images (edit sources, references) one request may carry; 0: text only.
    max_input_images: int = 0
    # Thinking models may send interim images (parts marked `thought`) before the final one.
    thinking: bool = False
    # The optional parameters it honours (see PARAMETERS) besides jpeg_quality (every model) and
    # person_generation (a model with person_generation_options); the rest are refused when set.
    parameters: list[str] = Field(default_factory=list)
    safety_settings: list[str] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    provider_price_usd: float = 0.0
    # Vertex AI only: the locations (GEN_VERTEX_LOCATION) Google serves it at; empty: not restricted here (served in
    # many regions, or the list is not known). A model not served at the configured location is not listed
    # (generator_service/served_models.py): every call would answer 404.
    vertex_locations: list[str] = Field(default_factory=list)
    # Per-model limits, so a burst queues here instead of failing at the provider.
    max_concurrency: int = 8
    requests_per_minute: int = 0  # 0: no limit

    @model_validator(mode="after")
    def _no_person_generation_on_the_gemini_api(self) -> ModelSpec:
        # The Gemini API refuses personGeneration (google-genai raises before sending), whatever a GEN_MODELS entry
        # says: such a model offers no options, so a request that sets one is refused instead of failing upstream.
        if self.provider == "gemini-image":
            self.person_generation_options = []
        return self

    @property
    def api_model(self) -> str:
        """The name to put in the provider's URL."""
        return self.provider_model or self.id

    def honours(self, parameter: str) -> bool:
        return parameter in self.honoured_parameters

    @property
    def honoured_parameters(self) -> list[str]:
        """Every optional parameter it takes, in PARAMETERS order (what ListModels reports)."""
        taken = {*self.parameters, *_ALWAYS_HONOURED}
        if self.person_generation_options:
            taken.add("person_generation")
        return [name for name in PARAMETERS if name in taken]

    @property
    def sends_size(self) -> bool:
        return len(self.image_sizes) > 1


def _gemini_image_models(provider: Literal["gemini-image", "vertex-gemini-image"]) -> list[ModelSpec]:
    """The Gemini image models ("Nano Banana") on the Gemini API or on Vertex AI: the same Google models.

    On the Gemini API they keep their Google ids; on Vertex AI they are listed as `vertex/<google id>`. Only
    Vertex AI takes `personGeneration` (google-genai refuses it on the Gemini API). The two `-preview` ids stay
    listed for the jobs and templates that name them, but Google shut those previews down (Gemini API 2026-06-25,
    Vertex AI 2026-07-17) in favour of the GA ids `gemini-3-pro-image` and `gemini-3.1-flash-image`.
    Gemini 3.1 Flash-Lite Image ("Nano Banana 2 Lite", GA 2026-06-30) makes 1K only and is served at Vertex AI's
    `global` location only (its model card).
    """
    vertex = provider == "vertex-gemini-image"
    prefix, where = ("vertex/", "Vertex AI") if vertex else ("", "Gemini API")
    people = list(PERSON_GENERATION) if vertex else []
    # The previews' Vertex model cards list one location, `global`; the GA models' cards list regions too.
    preview_locations = ["global"] if vertex else []

    def model(google_id: str, name: str, **spec: object) -> ModelSpec:
        return ModelSpec(
            id=f"{prefix}{google_id}",
            provider=provider,
            provider_model=google_id,
            display_name=f"{name} ({where})",
            person_generation_options=people,
            **spec,  # type: ignore[arg-type]
        )

    pro = {
        "aspect_ratios": list(GEMINI_ASPECT_RATIOS),
        "image_sizes": ["1K", "2K", "4K"],
        "max_input_images": 14,
        "thinking": True,
        "provider_price_usd": 0.134,  # 1K and 2K; 4K is 0.24
    }
    flash = {
        "aspect_ratios": list(GEMINI_31_ASPECT_RATIOS),
        "image_sizes": list(GEMINI_31_IMAGE_SIZES),
        "max_input_images": 14,
        "thinking": True,
        "provider_price_usd": 0.067,  # 1K; 512 is 0.045, 2K 0.101, 4K 0.151
    }
    lite = {
        # Its Vertex model card lists all 14 ratios and 14 input images; the Gemini API's model page says "14 aspect
        # ratios" too (the same model). Price: third-party quotes of Google's pricing (1120 tokens at $30 / 1M).
        "aspect_ratios": list(GEMINI_31_ASPECT_RATIOS),
        "max_input_images": 14,
        "thinking": True,
        "provider_price_usd": 0.0336,
        "vertex_locations": ["global"] if vertex else [],
    }
    retired = "preview, shut down by Google in 2026; use"
    return [
        model(
            "gemini-2.5-flash-image",
            "Gemini 2.5 Flash Image, Nano Banana",
            aspect_ratios=list(GEMINI_ASPECT_RATIOS),
            max_input_images=3,
            provider_price_usd=0.039,
        ),
        model("gemini-3-pro-image", "Gemini 3 Pro Image, Nano Banana Pro", **pro),
        model("gemini-3.1-flash-image", "Gemini 3.1 Flash Image, Nano Banana 2", **flash),
        model("gemini-3.1-flash-lite-image", "Gemini 3.1 Flash-Lite Image, Nano Banana 2 Lite", **lite),
        model(
            "gemini-3-pro-image-preview",
            f"Gemini 3 Pro Image {retired} {prefix}gemini-3-pro-image",
            vertex_locations=preview_locations,
            **pro,
        ),
        model(
            "gemini-3.1-flash-image-preview",
            f"Gemini 3.1 Flash Image {retired} {prefix}gemini-3.1-flash-image",
            vertex_locations=preview_locations,
            **flash,
        ),
    ]


def _default_models() -> list[ModelSpec]:
    # Google lists every Imagen endpoint on Vertex AI as deprecated and discontinued, to be replaced before
    # 2026-06-30 (its Imagen 4 model page). The entries stay for the jobs and templates that name them; their display
    # names say so, as the retired previews' do.
    imagen_retired = "Vertex AI, deprecated by Google: discontinued 2026-06-30"
    imagen_vertex = {
        "parameters": list(_IMAGEN_VERTEX_PARAMETERS),
        "safety_settings": list(SAFETY_SETTINGS),
        "languages": list(LANGUAGES),
    }
    return [
        ModelSpec(
            id="local",
            provider="local",
            display_name="Local placeholder renderer (offline, not AI)",
            aspect_ratios=list(GEMINI_31_ASPECT_RATIOS),
            # Every size the catalogue knows (512 is 3.1 Flash Image's), so an app can try each one offline.
            image_sizes=list(GEMINI_31_IMAGE_SIZES),
            max_input_images=14,
            # Everything but negative_prompt, which no catalogued Google model takes any more.
            parameters=[p for p in PARAMETERS if p != "negative_prompt"],
            safety_settings=list(SAFETY_SETTINGS),
            languages=list(LANGUAGES),
            max_concurrency=64,
        ),
        ModelSpec(
            id="imagen-4.0-generate-001",
            provider="vertex-imagen",
            display_name=f"Imagen 4 ({imagen_retired})",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.04,
            **imagen_vertex,  # type: ignore[arg-type]
        ),
        ModelSpec(
            id="imagen-4.0-ultra-generate-001",
            provider="vertex-imagen",
            display_name=f"Imagen 4 Ultra ({imagen_retired})",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.06,
            **imagen_vertex,  # type: ignore[arg-type]
        ),
        ModelSpec(
            id="imagen-4.0-fast-generate-001",
            provider="vertex-imagen",
            display_name=f"Imagen 4 Fast ({imagen_retired})",
            provider_price_usd=0.02,
            **imagen_vertex,  # type: ignore[arg-type]
        ),
        # The same Imagen 4 models on the Gemini API (the seed's endpoint). Google shut them down there in
        # 2026; they stay listed (when GEN_GEMINI_API_KEY is set) so a caller of the seed's model gets a
        # clear MODEL_NOT_SERVED answer naming the alternatives instead of an unknown-model error. The Gemini
        # API never took seed, watermark, prompt enhancement or negative prompts (google-genai refused them).
        ModelSpec(
            id="gemini-api/imagen-4.0-generate-001",
            provider="gemini-imagen",
            provider_model="imagen-4.0-generate-001",
            display_name="Imagen 4 (Gemini API, shut down by Google in 2026)",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.04,
        ),
        ModelSpec(
            id="gemini-api/imagen-4.0-ultra-generate-001",
            provider="gemini-imagen",
            provider_model="imagen-4.0-ultra-generate-001",
            display_name="Imagen 4 Ultra (Gemini API, shut down by Google in 2026)",
            image_sizes=["1K", "2K"],
            provider_price_usd=0.06,
        ),
        ModelSpec(
            id="gemini-api/imagen-4.0-fast-generate-001",
            provider="gemini-imagen",
            provider_model="imagen-4.0-fast-generate-001",
            display_name="Imagen 4 Fast (Gemini API, shut down by Google in 2026)",
            provider_price_usd=0.02,
        ),
        *_gemini_image_models("gemini-image"),
        *_gemini_image_models("vertex-gemini-image"),
    ]


class GeneratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GEN_", env_file=".env", extra="ignore", env_nested_delimiter="__")

    # Loopback by default: plaintext is then allowed (local development). Listening on other interfaces
    # needs TLS (tls_cert/tls_key) or allow_plaintext=true; see docs/security.md.
    host: str = "127.0.0.1"
    port: int = 50052
    # Seconds in-flight Generate streams get to finish after SIGTERM.
    shutdown_grace_seconds: float = 60.0
    # When set, callers must send `authorization: Bearer <token>` (the JobService -> generator hop).
    auth_token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # With TLS: require client certificates signed by this CA (mutual TLS).
    tls_client_ca: Path | None = None
    # Plaintext gRPC. Unset: allowed only on loopback; true: allowed anywhere (a private network, with
    # auth_token); false: never.
    allow_plaintext: bool | None = None
    # Beyond loopback, callers must prove who they are (auth_token, or tls_client_ca for mutual TLS): anyone
    # else could spend the provider's money and write images. true: serve unauthenticated callers anyway
    # (something in front authenticates them).
    allow_unauthenticated: bool = False
    # Largest request message accepted (gRPC's default is 4 MB): a GenerateMany start carries the attempt's input
    # images inline (up to 14 of up to 7 MB for the Gemini 3 image models). Past it gRPC answers RESOURCE_EXHAUSTED.
    max_request_mb: int = Field(default=128, ge=1, le=1024)
    metrics_port: int = 0  # 0: no metrics endpoint
    # Loopback unless set: a scraper on another machine needs e.g. 0.0.0.0.
    metrics_host: str = "127.0.0.1"
    # When set, event-loop lag (a histogram, see imagegen_common.loop_lag) is written to this file every second.
    loop_lag_file: Path | None = None
    log_format: LogFormat = "console"
    log_level: str = "INFO"

    # Models. A model is listed (and served) only when its provider is configured.
    models: list[ModelSpec] = Field(default_factory=_default_models)

    # local provider: seconds each Generate waits before rendering (uniform in [min, max]).
    local_latency_min_seconds: float = 0.0
    local_latency_max_seconds: float = 0.0

    # vertex-imagen: configured when the project is set; the token comes from Application Default Credentials.
    vertex_project: str | None = None
    vertex_location: str = "us-central1"
    # Default https://{location}-aiplatform.googleapis.com; the multi-regions "us" and "eu" are
    # https://aiplatform.{us|eu}.rep.googleapis.com and "global" is https://aiplatform.googleapis.com.
    vertex_base_url: str | None = None

    # gemini-imagen and gemini-image: configured when the API key is set.
    gemini_api_key: SecretStr | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com"

    # Provider HTTP. Imagen takes 5-30 s per request, so the read timeout is generous.
    provider_connect_timeout_seconds: float = 10.0
    provider_read_timeout_seconds: float = 60.0
    # Retries of one provider request (429, 5xx, timeouts, connection errors) within a time budget counted
    # from the first try; past it the attempt fails retryable and JobService schedules the next attempt.
    provider_max_retries: int = 3
    provider_retry_max_total_seconds: float = 60.0
    # Memory for provider answers being read, decoded and stored at once (each counts twice its size on the
    # wire); a burst of large (2K) answers past it waits for earlier ones to be stored. 0: no limit.
    provider_memory_budget_mb: int = Field(default=128, ge=0)
    # JPEG quality asked of Imagen (outputOptions.compressionQuality) and used when converting Gemini output.
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    # Most pixels a provider's image may have, read from its header before anything else: a PNG's pixel stream is
    # inflated to its end and a JPEG or WebP decoded in full before it is stored, so this bounds the memory and
    # CPU one image costs (4 bytes a pixel decoded). Comfortably above the largest image a supported
    # model returns (4K: 4096x4096 = 16.8 MP). At most Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS, process-
    # global, left at its default: it warns above 89478485 pixels and refuses twice that), so this is the bound
    # that decides.
    max_image_pixels: int = Field(default=40_000_000, ge=1, le=89_478_485)

    # Exponential backoff (with jitter) between retries, for providers and storage alike.
    retry_backoff_initial_seconds: float = 1.0
    retry_backoff_max_seconds: float = 30.0

    # Storage.
    storage_backend: Literal["local", "supabase"] = "local"
    storage_bucket: str = "images"
    # An optional folder inside the bucket that every object key starts with (both storage backends).
    storage_prefix: str = ""
    # supabase storage: public bucket -> public URLs; private -> signed URLs valid for the TTL below.
    storage_public: bool = True
    storage_signed_url_ttl_seconds: int = Field(default=3600, ge=1)
    storage_timeout_seconds: float = 30.0
    storage_max_retries: int = 3
    storage_retry_max_total_seconds: float = 30.0
    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    # local storage: files live under this folder and are served over HTTP.
    storage_dir: Path = Path(".data/storage")
    storage_http_host: str = "127.0.0.1"
    storage_http_port: int = 8088  # 0: any free port
    # The storage HTTP server drops a connection whose request head has not arrived within this long (and an
    # idle keep-alive connection after as long) ...
    storage_http_request_timeout_seconds: float = Field(default=10.0, gt=0)
    # ... and one that has not taken an answer within this long (a client that stopped reading).
    storage_http_send_timeout_seconds: float = Field(default=120.0, gt=0)
    # At most this many connections at once; past it a new one closes the one that has waited longest for a
    # request head, or, if every one is busy answering, gets 503.
    storage_http_max_connections: int = Field(default=256, ge=1)
    # The base URL that local storage URLs start with; default http://{storage_http_host}:{port}.
    storage_public_base_url: str | None = None
