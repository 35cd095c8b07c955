"""What a user is told when an attempt fails: the stable reason, and one plain sentence chosen here per reason.

The generator's message is written for operators and quotes the provider or storage word for word, which can
name the billing project, the key's project, an internal host or a bucket. None of that is the user's business,
and a provider's wording changes without notice. So `Job.error.message` (and the event's message) is the
sentence below for the reason; the generator's full text goes to the log only, bounded, with the job id.
"""

from __future__ import annotations

GENERIC_MESSAGE = "The images could not be generated."

_OUR_CONFIGURATION = "The image service is misconfigured for this model's provider."
_STORAGE = "The images could not be stored."

USER_MESSAGES: dict[str, str] = {
    # Of the request: the user can change something.
    "PROMPT_BLOCKED": "The provider refused the prompt. Rephrase it and try again.",
    "ALL_IMAGES_FILTERED": "Every image was withheld by the provider's safety filters.",
    "PROVIDER_REJECTED": "The provider rejected the request's parameters.",
    "INVALID_ARGUMENT": "The generator refused the request's parameters.",
    "UNKNOWN_MODEL": "The model is not served.",
    "INPUT_IMAGE_NOT_FOUND": "An input image is no longer stored.",
    "INPUT_IMAGE_MISSING": "An input image is no longer stored.",
    "MODEL_NOT_FOUND": "The model is not available from its provider.",
    "MODEL_NOT_SERVED": "The model is no longer available from its provider.",
    # Of the provider.
    "NO_IMAGES": "The provider returned no images.",
    "PROVIDER_NO_IMAGE": "The model finished without making an image.",
    "PROVIDER_OUTPUT_LIMIT": "The model ran out of output budget before making an image.",
    "MODEL_ANSWERED_TEXT": "The model answered in words instead of an image. Rephrase the prompt and try again.",
    "PROVIDER_RATE_LIMITED": "The provider's usage limit was reached.",
    "PROVIDER_UNAVAILABLE": "The provider was unavailable.",
    "PROVIDER_TIMEOUT": "The provider did not answer in time.",
    "BAD_PROVIDER_RESPONSE": "The provider's answer could not be used.",
    "PROVIDER_IMAGE_INVALID": "The provider sent an image that could not be read.",
    "PROVIDER_IMAGE_TOO_LARGE": "The provider sent an image larger than allowed.",
    "PROVIDER_PERMISSION_DENIED": _OUR_CONFIGURATION,
    "PROVIDER_UNAUTHENTICATED": _OUR_CONFIGURATION,
    "PROVIDER_CREDENTIALS_MISSING": _OUR_CONFIGURATION,
    # Of storage.
    "STORAGE_UNAVAILABLE": _STORAGE,
    "STORAGE_FAILED": _STORAGE,
    "STORAGE_CONFLICT": _STORAGE,
    "STORAGE_PERMISSION_DENIED": _STORAGE,
    "STORAGE_BUCKET_NOT_FOUND": _STORAGE,
    "STORAGE_REJECTED": _STORAGE,
    "STORAGE_REDIRECTED": _STORAGE,
    # Of the generator and JobService.
    "GENERATOR_UNAVAILABLE": "The image generator could not be reached.",
    "DEADLINE_EXCEEDED": "The image generator did not answer in time.",
    "STREAM_ENDED": "The image generator stopped before finishing.",
    "ATTEMPT_RUNNING": "The attempt was already running.",
    "UNDECODABLE_REQUEST": "An internal error stopped the generation.",
    "INTERNAL": "An internal error stopped the generation.",
}

# The generator's text in the log: long enough for any real provider message, bounded for one that is not.
MAX_LOGGED_DETAIL_CHARS = 2000


def user_message(reason: str) -> str:
    """The plain sentence for `reason`; a reason this JobService does not know (a newer generator's) gets the
    generic one, never the generator's text."""
    return USER_MESSAGES.get(reason, GENERIC_MESSAGE)


def logged_detail(message: str) -> str:
    """The generator's message for the log: control characters escaped (no forged log lines), length bounded."""
    clipped = message[:MAX_LOGGED_DETAIL_CHARS]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)
    return text + (f" ... ({len(message)} chars)" if len(message) > MAX_LOGGED_DETAIL_CHARS else "")
