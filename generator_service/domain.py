"""What one Generate call is about, independent of gRPC: the request, its events, its errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument

# Imagen's output sizes per aspect ratio (Vertex AI model cards), in pixels.
SIZES_1K = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408), "16:9": (1408, 768)}
SIZES_2K = {"1:1": (2048, 2048), "3:4": (1792, 2560), "4:3": (2560, 1792), "9:16": (1536, 2816), "16:9": (2816, 1536)}
MIME_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg"}
# Every extension an object key can end with, and the content type it is served with (local storage).
EXTENSION_TYPES = {**{ext: mime for mime, ext in MIME_EXTENSIONS.items()}, "bin": "application/octet-stream"}


def is_canonical_uuid(value: str) -> bool:
    """A UUID in its one canonical spelling (lower-case, hyphenated), so that one id names one folder."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def id_violations(user_id: str, job_id: str) -> list[FieldViolation]:
    """What is wrong with a (user, job) pair that names a folder in storage; empty when both are usable."""
    problems: list[FieldViolation] = []
    for name, value in (("user_id", user_id), ("job_id", job_id)):
        if not is_canonical_uuid(value):
            problems.append(FieldViolation(name, "must be a UUID (lower-case, hyphenated)"))
    return problems


def job_folder(user_id: str, job_id: str) -> str:
    """The storage folder of one job, `{user}/{job}`, built only from ids that are UUIDs.

    Ids come from the caller: anything else ("../<other user>/<job>") could name another user's folder,
    so this refuses it (INVALID_ARGUMENT with BadRequest) instead of building a key from it.
    """
    problems = id_violations(user_id, job_id)
    if problems:
        raise invalid_request(problems)
    return f"{user_id}/{job_id}"


def invalid_request(problems: list[FieldViolation]) -> ServiceError:
    """INVALID_ARGUMENT with every bad field (imagegen_common.errors.invalid_argument), marked not retryable: the
    same request fails the same way, so JobService must not spend another attempt on it."""
    error = invalid_argument(problems)
    error.metadata["retryable"] = "false"
    return error


# The long-ish side of a square image per size name; other ratios keep about the same pixel count.
_SIZE_EDGE = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}


def image_dimensions(aspect_ratio: str, image_size: str) -> tuple[int, int]:
    """Imagen's size table where it has the ratio, else about edge² pixels in the ratio, multiples of 16.

    Only the local provider and the fakes draw at these sizes: a real provider's image keeps the size it has.
    """
    table = SIZES_2K if image_size == "2K" else SIZES_1K
    if image_size in ("1K", "2K") and aspect_ratio in table:
        return table[aspect_ratio]
    w, h = (int(x) for x in aspect_ratio.split(":"))
    edge = _SIZE_EDGE.get(image_size, 1024)
    scale = (edge * edge / (w * h)) ** 0.5
    return max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)


@dataclass(frozen=True)
class InputImage:
    """An image the model takes in (an edit source or a reference), sent in order after the prompt: its bytes, or
    the storage key of one of the same user's stored images (read from storage before the provider is called)."""

    data: bytes = field(repr=False)
    mime_type: str
    storage_path: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    job_id: str
    attempt: int
    user_id: str
    prompt: str
    model: str
    sample_count: int
    aspect_ratio: str = "1:1"
    image_size: str = "1K"
    # "": the model's own default; a model without person-generation control refuses any other value.
    person_generation: str = ""
    output_mime_type: str = "image/png"
    # Optional parameters (ModelSpec.parameters): None / "" / 0 mean "not set", and only a model that
    # honours one accepts it set.
    seed: int | None = None
    add_watermark: bool | None = None
    enhance_prompt: bool | None = None
    negative_prompt: str = ""
    safety_setting: str = ""
    language: str = ""
    jpeg_quality: int = 0
    input_images: tuple[InputImage, ...] = ()

    def storage_path(self, index: int, mime_type: str) -> str:
        """Deterministic per (job, attempt, index): a rerun of the same attempt overwrites its own objects.

        Built only from checked parts: the ids (UUIDs, checked again here), integers and a fixed extension.
        """
        extension = MIME_EXTENSIONS.get(mime_type, "bin")
        return f"{job_folder(self.user_id, self.job_id)}/{int(self.attempt)}-{int(index)}.{extension}"

    def set_parameters(self) -> list[str]:
        """The optional parameters this request sets, by name (config.PARAMETERS)."""
        values = {
            "person_generation": self.person_generation,
            "seed": self.seed is not None,
            "add_watermark": self.add_watermark is not None,
            "enhance_prompt": self.enhance_prompt is not None,
            "negative_prompt": self.negative_prompt,
            "safety_setting": self.safety_setting,
            "language": self.language,
            "jpeg_quality": self.jpeg_quality,
        }
        return [name for name, value in values.items() if value]


@dataclass(frozen=True)
class GeneratedImage:
    index: int
    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class FilteredImage:
    index: int
    reason: str


@dataclass(frozen=True)
class Started:
    provider: str
    model: str


@dataclass(frozen=True)
class Stored:
    index: int
    url: str
    storage_path: str
    mime_type: str
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class Completed:
    delivered_count: int
    filtered_count: int
    filtered_reasons: list[str] = field(default_factory=list)


GenerationEvent = Started | Stored | Completed


def generation_error(
    kind: ErrorKind, reason: str, message: str, *, retryable: bool, retry_after: float | None = None
) -> ServiceError:
    """A failed attempt. `retryable` travels in ErrorInfo metadata so JobService can decide to retry."""
    return ServiceError(kind, reason, message, metadata={"retryable": str(retryable).lower()}, retry_after=retry_after)
