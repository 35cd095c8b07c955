"""JobService's domain: jobs, their states and events, credits, the caller. No gRPC, no SQL."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from enum import StrEnum

from imagegen_common.errors import ImagegenError


class JobState(StrEnum):
    # The seed's lower-case values, as stored in generation_jobs.status (Realtime clients read them).
    PENDING = "pending"
    GENERATING = "generating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not started before its start deadline (see the migration 20261206000210).
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


class JobEventType(StrEnum):
    CREATED = "created"
    ATTEMPT_STARTED = "attempt_started"
    GENERATION_STARTED = "generation_started"
    IMAGE_STORED = "image_stored"
    COMPLETED = "completed"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    LEASE_EXPIRED = "lease_expired"
    HANDED_BACK = "handed_back"
    EXPIRED = "expired"


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED})

# Priorities: 0 (lowest) to 9 (highest). The bounds are also the generation_jobs.priority CHECK constraint.
MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5


# The optional generation parameters (a model honours those its ModelInfo.parameters names). Unset values are
# None / "" / 0, and as_dict leaves them out: the stored params and the idempotency hash of a request that sets
# none of them stay what they were before these parameters existed.
OPTIONAL_PARAMS = (
    "seed",
    "add_watermark",
    "enhance_prompt",
    "negative_prompt",
    "safety_setting",
    "language",
    "jpeg_quality",
)


@dataclass(frozen=True)
class InputRef:
    """One input image of a job, as stored in its params: inline bytes (kept in job_input_blobs under their
    sha256) or one of the same user's delivered images of an earlier job (by storage key, read by the generator)."""

    mime_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str = ""
    job_id: str = ""
    index: int = -1
    storage_path: str = ""

    def as_dict(self) -> dict[str, object]:
        common: dict[str, object] = {
            "mime_type": self.mime_type,
            "width": self.width,
            "height": self.height,
            "size_bytes": self.size_bytes,
        }
        if self.sha256:
            return {**common, "sha256": self.sha256}
        return {**common, "job_id": self.job_id, "index": self.index, "storage_path": self.storage_path}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> InputRef:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Params:
    sample_count: int = 4
    aspect_ratio: str = "1:1"
    image_size: str = "1K"
    # "" on a model without person-generation control (JobManager fits the default to the model).
    person_generation: str = "allow_adult"
    output_mime_type: str = "image/png"
    seed: int | None = None
    add_watermark: bool | None = None
    enhance_prompt: bool | None = None
    negative_prompt: str = ""
    safety_setting: str = ""
    language: str = ""
    jpeg_quality: int = 0
    # In the order they go to the model, after the prompt.
    input_images: tuple[InputRef, ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> Params:
        """From the stored JSON (unknown keys, e.g. a newer version's, are left out)."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        inputs = known.pop("input_images", None)
        if isinstance(inputs, list):
            known["input_images"] = tuple(InputRef.from_dict(i) for i in inputs if isinstance(i, dict))
        return cls(**known)  # type: ignore[arg-type]

    @property
    def parent(self) -> InputRef | None:
        """The job's lineage: the first earlier job's image it was made from, if any."""
        return next((i for i in self.input_images if i.job_id), None)

    def as_dict(self) -> dict[str, object]:
        values: dict[str, object] = {
            "sample_count": self.sample_count,
            "aspect_ratio": self.aspect_ratio,
            "image_size": self.image_size,
            "person_generation": self.person_generation,
            "output_mime_type": self.output_mime_type,
        }
        values.update({name: value for name in OPTIONAL_PARAMS if (value := getattr(self, name)) not in (None, "", 0)})
        # False is a choice (add_watermark=false), not "unset": kept.
        values.update({n: False for n in ("add_watermark", "enhance_prompt") if getattr(self, n) is False})
        if self.input_images:
            values["input_images"] = [i.as_dict() for i in self.input_images]
        return values

    def set_optional(self) -> list[str]:
        """The optional parameters this job sets."""
        return [
            name
            for name in OPTIONAL_PARAMS
            if getattr(self, name) is not None
            and getattr(self, name) != ""
            and not (name == "jpeg_quality" and getattr(self, name) == 0)
        ]


@dataclass(frozen=True)
class StoredImage:
    index: int
    url: str
    storage_path: str
    mime_type: str
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class Job:
    id: str
    user_id: str
    status: JobState
    prompt: str
    model: str
    params: Params
    template_id: str | None
    request_id: str | None
    images: list[StoredImage]
    filtered_count: int
    filtered_reasons: list[str]
    error_code: str | None
    error_message: str | None
    attempt: int
    failed_attempts: int
    max_attempts: int
    credits_reserved: int
    credits_charged: int
    cancel_requested: bool
    lease_owner: str | None
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    completed_at: datetime | None
    next_attempt_at: datetime
    last_event_seq: int
    # When the job's objects were queued for deletion (retention or DeleteJob): its images answer as deleted.
    images_deleted_at: datetime | None = None
    # When DeleteJob was called: the job is no one's to read any more; its row goes once its objects have.
    deleted_at: datetime | None = None
    webhook_url: str | None = None
    # Event type names ('job.completed', ...) sent to webhook_url.
    webhook_events: list[str] = field(default_factory=list)
    priority: int = DEFAULT_PRIORITY
    # A job not started (attempt 0) by then ends EXPIRED; None: no deadline.
    start_deadline: datetime | None = None

    @property
    def images_owed(self) -> int:
        """The images an attempt is still to deliver: every image an earlier attempt delivered stays the job's
        (and is charged), so a retry asks only for the rest and the job never delivers more than sample_count."""
        return max(0, self.params.sample_count - len(self.images))


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    seq: int
    type: JobEventType
    status: JobState
    attempt: int
    at: datetime
    message: str = ""


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    description: str
    prompt_template: str
    variables: list[str]
    model: str
    default_params: dict[str, object]
    price_per_image: int | None
    is_active: bool


@dataclass(frozen=True)
class CreditBalance:
    user_id: str
    balance: int
    reserved: int
    premium: bool


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (acting for themselves) or an internal service (acting for anyone)."""

    subject: str
    is_service: bool = False
    is_anonymous: bool = False
    # The JWKS key (kid) that signed the caller's token; None for HS256 tokens.
    key_id: str | None = None
    claims: dict[str, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class ModelInfo:
    """A model's capabilities, as GeneratorService lists them."""

    id: str
    aspect_ratios: list[str]
    image_sizes: list[str]
    max_sample_count: int
    person_generation_options: list[str]
    display_name: str = ""
    provider: str = ""
    max_input_images: int = 0
    thinking: bool = False
    # The optional parameters (OPTIONAL_PARAMS, plus "person_generation") it honours.
    parameters: list[str] = field(default_factory=list)
    safety_settings: list[str] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)


# What GeneratorService reports about one attempt (see generator_client, which speaks the protocol).
@dataclass(frozen=True)
class GenerationStarted:
    provider: str


@dataclass(frozen=True)
class ImageStored:
    image: StoredImage


@dataclass(frozen=True)
class GenerationCompleted:
    delivered_count: int
    filtered_count: int
    filtered_reasons: list[str]


GenerationEvent = GenerationStarted | ImageStored | GenerationCompleted


@dataclass
class GenerationFailure(ImagegenError):
    """An attempt that did not complete.

    `retryable`: another attempt may succeed. `counts`: it uses up one of the job's attempts (a
    generator that could not be reached at all does not: the job waits for it instead of failing).
    """

    reason: str
    message: str
    _: KW_ONLY
    retryable: bool
    counts: bool = True
    retry_after: float | None = None

    def __post_init__(self) -> None:
        super().__init__(f"{self.reason}: {self.message}")
