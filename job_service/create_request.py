"""CreateJob's request judged: the job to create (a NewJob, priced and hashed) or every field violation at once.

Pure: what the request names (its template, the model catalogue, its input images) is looked up by the caller
(jobs.JobManager.create_job) and passed in. No I/O, no asyncio, no gRPC.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError
from job_service.domain import MAX_PRIORITY, MIN_PRIORITY, InputRef, ModelInfo, Params, Template
from job_service.templates import render
from job_service.webhooks import DEFAULT_EVENTS, WebhookPolicy, event_violations, url_violations

# Static limits, for when the generator's catalogue cannot be read: every value some model takes (the generator
# re-validates each attempt against the model's own list).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "1:4", "4:1", "1:8", "8:1")
IMAGE_SIZES = ("512", "1K", "2K", "4K")
PERSON_GENERATION = ("dont_allow", "allow_adult", "allow_all")
MIME_TYPES = ("image/png", "image/jpeg")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
REQUEST_ID_RULE = "1-64 characters of A-Z a-z 0-9 _ . : -"
# C0 control characters other than tab, newline and carriage return. NUL in particular cannot be stored
# in a PostgreSQL text column at all, so it must be refused here rather than fail in the database.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_NAME_CHARS = 128  # model and template ids
MAX_SAMPLE_COUNT = 4  # images per job, whatever more a model could make
MAX_SEED = 2_147_483_647  # Imagen's seed is a positive int32
MAX_NEGATIVE_PROMPT_CHARS = 1_000
MIN_START_WITHIN_SECONDS = 1.0
MAX_START_WITHIN_SECONDS = 7 * 86_400.0
# More distinct webhook events than there are is a client bug: one violation, not one per entry.
MAX_WEBHOOK_EVENTS = 16


@dataclass(frozen=True)
class InputImageInput:
    """One input image as CreateJob got it: inline bytes, or (job_id, index) of one of the caller's images."""

    data: bytes = b""
    job_id: str = ""
    index: int = 0


@dataclass(frozen=True)
class CreateJobInput:
    prompt: str = ""
    model: str = ""
    params: Params | None = None
    # Fields the caller set explicitly (the rest come from the template, then the defaults).
    params_set: frozenset[str] = frozenset()
    template_id: str = ""
    template_variables: Mapping[str, str] | None = None
    request_id: str = ""
    user_id: str = ""
    webhook_url: str = ""
    # Event names (webhooks.WebhookEvent values); empty: DEFAULT_EVENTS.
    webhook_events: tuple[str, ...] = ()
    # None: the account's default.
    priority: int | None = None
    # Seconds within which the job must start, or it ends EXPIRED; None: no deadline.
    start_within: float | None = None
    input_images: tuple[InputImageInput, ...] = ()


@dataclass(frozen=True)
class RequestRules:
    """The settings a request is judged by (from jobs.JobPolicy)."""

    default_model: str
    max_prompt_chars: int
    default_price_per_image: int
    model_prices: Mapping[str, int]
    # What a webhook URL may be; None: webhooks are off (no signing secret is configured).
    webhooks: WebhookPolicy | None = None


@dataclass(frozen=True)
class NewJob:
    """A job as the request asks for it, checked, with its price and idempotency hash: what the store creates.

    The account's own rules (active-job cap, welcome credits, priority and rate rules) are not here: they are the
    caller's (jobs.JobPolicy), applied by the store under the account's lock.
    """

    user_id: str
    prompt: str
    model: str
    # Fitted to the model, with the checked input images.
    params: Params
    template_id: str | None
    request_id: str | None
    request_hash: str
    price_per_image: int
    # {"url", "events"} as the job stores it; None: no webhook.
    webhook: dict[str, object] | None
    # None: the account's default.
    priority: int | None
    start_within: float | None


def bad_text(value: str, max_chars: int | None = None) -> str | None:
    """Why a free-text field is unacceptable, or None."""
    if _CONTROL_CHARS.search(value):
        return "must not contain control characters"
    if max_chars is not None and len(value) > max_chars:
        return f"at most {max_chars} characters"
    return None


def job_model(request: CreateJobInput, template: Template | None, default_model: str) -> str:
    """The model the job runs on: the request's, else its template's, else the default."""
    return request.model or (template.model if template and template.model else default_model)


def check_create_request(
    request: CreateJobInput,
    *,
    user_id: str,
    template: Template | None,
    catalog: Mapping[str, ModelInfo] | None,
    rules: RequestRules,
    inputs: Sequence[InputRef] = (),
    input_violations: Sequence[FieldViolation] = (),
) -> NewJob | list[FieldViolation]:
    """The job the request asks for, or every field violation of it (the input images' ones included, last).

    `template`: the active template the request's template_id names (looked up, refused if missing or inactive,
    by the caller); None without one. `catalog`: the generator's models, or None when it cannot be read: the params
    are then checked against the static limits only (the generator re-validates each attempt). `inputs` and
    `input_violations`: the request's input images as the caller checked them (bytes sniffed, references read).

    Raises ServiceError WEBHOOKS_DISABLED for a webhook_url when webhooks are off: a setting of this service, not a
    field the caller can fix.
    """
    # Every problem of the request is reported at once: a bad name is not looked up, and the rest is still checked
    # (params against the static limits when the model cannot be named).
    bad_names = {
        name: problem
        for name, value in (("template_id", request.template_id), ("model", request.model))
        if (problem := bad_text(value, MAX_NAME_CHARS))
    }
    violations = [FieldViolation(name, problem) for name, problem in bad_names.items()]
    prompt = request.prompt
    if template is not None:
        if request.prompt:
            violations.append(FieldViolation("prompt", "must be empty when template_id is set"))
        variables = request.template_variables or {}
        prompt, template_violations = render(template.prompt_template, variables)
        violations += template_violations
        violations += [
            FieldViolation(f"template_variables[{name}]", problem)
            for name, value in variables.items()
            if name in template.variables and (problem := bad_text(value))
        ]
    elif request.template_variables and not request.template_id:
        violations.append(FieldViolation("template_variables", "only allowed with template_id"))

    if "template_id" not in bad_names:  # else the prompt comes from a template that cannot be named
        violations += _prompt_violations(prompt, template, rules.max_prompt_chars)
    if request.request_id and not REQUEST_ID.match(request.request_id):
        violations.append(FieldViolation("request_id", REQUEST_ID_RULE))
    webhook, webhook_violations = _webhook(request, rules.webhooks)
    violations += webhook_violations
    if request.priority is not None and not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
        violations.append(FieldViolation("priority", f"must be {MIN_PRIORITY}-{MAX_PRIORITY}"))
    if request.start_within is not None and not (
        MIN_START_WITHIN_SECONDS <= request.start_within <= MAX_START_WITHIN_SECONDS
    ):
        violations.append(FieldViolation("start_within", "must be between 1 second and 7 days"))

    model = job_model(request, template, rules.default_model)
    params, model_violations = _fit_to_model(
        model,
        _merge_params(request, template),
        catalog if "model" not in bad_names else None,
        count_is_default=not _chosen("sample_count", request, template),
        person_is_default=not _chosen("person_generation", request, template),
    )
    violations += model_violations
    violations += input_violations
    if violations:
        return violations
    if inputs:
        params = replace(params, input_images=tuple(inputs))
    price = (
        template.price_per_image
        if template and template.price_per_image is not None
        else rules.model_prices.get(model, rules.default_price_per_image)
    )
    return NewJob(
        user_id=user_id,
        prompt=prompt,
        model=model,
        params=params,
        template_id=template.id if template else None,
        request_id=request.request_id or None,
        request_hash=_request_hash(request, prompt, model, params, webhook),
        price_per_image=price,
        webhook=webhook,
        priority=request.priority,
        start_within=request.start_within,
    )


def _request_hash(
    request: CreateJobInput, prompt: str, model: str, params: Params, webhook: dict[str, object] | None
) -> str:
    """The idempotency digest: a replay of a request_id must ask for the same job. Stored with the job, so its
    composition is fixed: each field added since is added only when set, and the digest of a request without it is
    the one it always was (a replay across an upgrade stays a replay)."""
    identity: list[object] = [prompt, model, params.as_dict(), request.template_id]
    if webhook is not None:
        identity.append(webhook)
    if request.priority is not None or request.start_within is not None:
        identity += [request.priority, request.start_within]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _chosen(name: str, request: CreateJobInput, template: Template | None) -> bool:
    """Whether the request or its template set this param (else the default applies, fitted to the model)."""
    return name in request.params_set or (template is not None and name in template.default_params)


def _prompt_violations(prompt: str, template: Template | None, max_chars: int) -> list[FieldViolation]:
    if not prompt.strip():
        return [FieldViolation("prompt", "required (or set template_id)")]
    if len(prompt) > max_chars:
        field = "prompt" if not template else "template_variables"
        return [FieldViolation(field, f"the prompt may have at most {max_chars} characters")]
    if not template and _CONTROL_CHARS.search(prompt):
        return [FieldViolation("prompt", "must not contain control characters")]
    return []


def _webhook(
    request: CreateJobInput, policy: WebhookPolicy | None
) -> tuple[dict[str, object] | None, list[FieldViolation]]:
    """The job's webhook ({"url", "events"}) as it is stored, or None; and what is wrong with the request's."""
    if not request.webhook_url:
        if request.webhook_events:
            return None, [FieldViolation("webhook_events", "only allowed with webhook_url")]
        return None, []
    if policy is None:
        raise ServiceError(
            ErrorKind.FAILED_PRECONDITION,
            "WEBHOOKS_DISABLED",
            "this service sends no webhooks (no JOB_WEBHOOK_SECRETS is configured)",
        )
    violations = url_violations(request.webhook_url, policy)
    events = sorted(set(request.webhook_events))
    if len(events) > MAX_WEBHOOK_EVENTS:
        violations.append(FieldViolation("webhook_events", f"at most {MAX_WEBHOOK_EVENTS} distinct events"))
    else:
        violations += event_violations(events)
    chosen = events or sorted(e.value for e in DEFAULT_EVENTS)
    return {"url": request.webhook_url, "events": chosen}, violations


def _merge_params(request: CreateJobInput, template: Template | None) -> Params:
    """Request over template defaults over the documented defaults."""
    merged = Params()
    if template:
        merged = replace(merged, **template.default_params)  # type: ignore[arg-type]
    if request.params is not None:
        explicit = {name: getattr(request.params, name) for name in request.params_set}
        merged = replace(merged, **explicit)
    return merged


def _fit_to_model(
    model: str,
    params: Params,
    catalog: Mapping[str, ModelInfo] | None,
    *,
    count_is_default: bool,
    person_is_default: bool,
) -> tuple[Params, list[FieldViolation]]:
    """The params (defaults fitted to the model) and what the model cannot do.

    Every check reads the generator's declaration of the model (ModelInfo): a parameter it does not honour is
    refused naming the model and the field, never dropped. Without the catalogue only the static limits are checked.
    """
    violations: list[FieldViolation] = []
    info = catalog.get(model) if catalog is not None else None
    if catalog is not None and info is None:
        return params, [FieldViolation("model", f"unknown model {model!r}; one of: {', '.join(sorted(catalog))}")]
    max_samples = min(info.max_sample_count, MAX_SAMPLE_COUNT) if info else MAX_SAMPLE_COUNT
    if count_is_default and params.sample_count > max_samples:
        # The caller left the count unset: "as many as the model makes", up to the default of 4.
        params = replace(params, sample_count=max_samples)
    if info is not None and person_is_default and not info.person_generation_options:
        # The documented default means "the model's own behaviour" on a model without the control.
        params = replace(params, person_generation="")
    ratios = info.aspect_ratios if info else list(ASPECT_RATIOS)
    sizes = info.image_sizes if info else list(IMAGE_SIZES)
    people = info.person_generation_options if info else list(PERSON_GENERATION)
    if not 1 <= params.sample_count <= max_samples:
        violations.append(FieldViolation("params.sample_count", f"must be 1-{max_samples}"))
    if params.aspect_ratio not in ratios:
        violations.append(FieldViolation("params.aspect_ratio", f"{model} supports {', '.join(ratios)}"))
    if params.image_size not in sizes:
        violations.append(FieldViolation("params.image_size", f"{model} supports {', '.join(sizes)}"))
    if params.person_generation and params.person_generation not in people:
        problem = f"must be one of {', '.join(people)}" if people else f"{model} does not take person_generation"
        violations.append(FieldViolation("params.person_generation", problem))
    if params.output_mime_type not in MIME_TYPES:
        violations.append(FieldViolation("params.output_mime_type", f"must be one of {', '.join(MIME_TYPES)}"))
    violations += _optional_violations(model, params, info)
    return params, violations


def _optional_violations(model: str, params: Params, info: ModelInfo | None) -> list[FieldViolation]:
    """The optional parameters (seed, watermark, ...): each only where the model honours it, within bounds."""
    violations: list[FieldViolation] = []
    set_now = params.set_optional()
    if info is not None:
        violations += [
            FieldViolation(f"params.{name}", f"{model} does not take {name}")
            for name in set_now
            if name not in info.parameters
        ]
    refused = {v.field for v in violations}

    def check(name: str, problem: str | None) -> None:
        if problem and name in set_now and f"params.{name}" not in refused:
            violations.append(FieldViolation(f"params.{name}", problem))

    seed = params.seed
    check("seed", f"must be 1-{MAX_SEED}" if seed is not None and not 1 <= seed <= MAX_SEED else None)
    check(
        "seed",
        "needs add_watermark=false (a watermarked image takes no seed)"
        if seed is not None and 1 <= seed <= MAX_SEED and params.add_watermark is not False
        else None,
    )
    check("negative_prompt", bad_text(params.negative_prompt, MAX_NEGATIVE_PROMPT_CHARS))
    # Without the catalogue (generator unreachable) only the generator can tell; it re-validates each attempt.
    levels = info.safety_settings if info else [params.safety_setting]
    check("safety_setting", None if params.safety_setting in levels else f"must be one of {', '.join(levels)}")
    languages = info.languages if info else [params.language]
    check("language", None if params.language in languages else f"must be one of {', '.join(languages)}")
    quality = params.jpeg_quality
    check("jpeg_quality", "must be 1-100" if not 1 <= quality <= 100 else None)
    check(
        "jpeg_quality",
        "only with output_mime_type image/jpeg"
        if 1 <= quality <= 100 and params.output_mime_type != "image/jpeg"
        else None,
    )
    return violations
