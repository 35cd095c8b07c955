"""What one Generate call is about, independent of gRPC: the request, its events, its errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError

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
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            f"invalid request: {summary}",
            problems,
            metadata={"retryable": "false"},
        )
    return f"{user_id}/{job_id}"


def image_dimensions(aspect_ratio: str, image_size: str) -> tuple[int, int]:
    return (SIZES_2K if image_size == "2K" else SIZES_1K)[aspect_ratio]


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
    person_generation: str = "allow_adult"
    output_mime_type: str = "image/png"

    def storage_path(self, index: int, mime_type: str) -> str:
        """Deterministic per (job, attempt, index): a rerun of the same attempt overwrites its own objects.

        Built only from checked parts: the ids (UUIDs, checked again here), integers and a fixed extension.
        """
        extension = MIME_EXTENSIONS.get(mime_type, "bin")
        return f"{job_folder(self.user_id, self.job_id)}/{int(self.attempt)}-{int(index)}.{extension}"


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
