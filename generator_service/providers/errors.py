"""Provider failures as ServiceErrors: a gRPC code, a stable reason, and whether another attempt may help."""

from __future__ import annotations

from generator_service.domain import generation_error
from generator_service.providers.http import HttpFailure
from generator_service.providers.images import BadImage
from imagegen_common.errors import ErrorKind, ServiceError


def bad_response(provider: str, detail: str) -> ServiceError:
    """The provider answered 2xx with something unusable; usually a glitch, so worth another attempt."""
    return generation_error(
        ErrorKind.UNAVAILABLE,
        "BAD_PROVIDER_RESPONSE",
        f"{provider} returned an unusable answer: {detail}",
        retryable=True,
    )


def bad_image(provider: str, which: str, problem: BadImage) -> ServiceError:
    """The provider's image cannot be used: not decodable, or more pixels than allowed.

    Not retryable: another attempt is another paid call, and a provider that sent this once is likely to send it
    again. FAILED_PRECONDITION, not UNAVAILABLE, which generic gRPC clients retry.
    """
    return generation_error(
        ErrorKind.FAILED_PRECONDITION,
        "PROVIDER_IMAGE_TOO_LARGE" if problem.too_large else "PROVIDER_IMAGE_INVALID",
        f"{provider} sent an unusable image ({which}): {problem}",
        retryable=False,
    )


def error_for_failure(failure: HttpFailure, provider: str, model: str) -> ServiceError:
    """The default meaning of an HTTP failure; providers handle their special cases before calling this."""
    status, said = failure.status, failure.message
    if status is None:
        reason = "PROVIDER_TIMEOUT" if failure.timed_out else "PROVIDER_UNAVAILABLE"
        return generation_error(
            ErrorKind.UNAVAILABLE, reason, f"{provider} request for {model} failed: {said}", retryable=True
        )
    if status == 429:
        return generation_error(
            ErrorKind.RESOURCE_EXHAUSTED,
            "PROVIDER_RATE_LIMITED",
            f"{provider} quota or rate limit reached for {model}: {said}",
            retryable=True,
            retry_after=failure.retry_after,
        )
    # The Gemini API answers a wrong key with 400 "API key not valid": configuration, not a bad request.
    if status in (401, 403) or (status == 400 and "api key not valid" in said.lower()):
        # Wrong key, wrong project, API not enabled, or missing IAM role: retrying cannot fix configuration.
        reason = "PROVIDER_UNAUTHENTICATED" if status == 401 else "PROVIDER_PERMISSION_DENIED"
        return generation_error(
            ErrorKind.PERMISSION_DENIED,
            reason,
            f"{provider} refused the credentials for {model} (check the key/project settings): {said}",
            retryable=False,
        )
    if status == 404:
        return generation_error(
            ErrorKind.NOT_FOUND,
            "MODEL_NOT_FOUND",
            f"{provider} does not know model {model}: {said}",
            retryable=False,
        )
    if status >= 500 or status == 408:
        return generation_error(
            ErrorKind.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
            f"{provider} failed (HTTP {status}) for {model}: {said}",
            retryable=True,
            retry_after=failure.retry_after,
        )
    return generation_error(
        ErrorKind.INVALID_ARGUMENT,
        "PROVIDER_REJECTED",
        f"{provider} rejected the request (HTTP {status}): {said}",
        retryable=False,
    )
