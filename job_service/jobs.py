"""JobService's use cases: create, read, list, watch and cancel jobs; templates; credits. No gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import structlog
from PIL import Image

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument
from job_service.dispatcher import DispatchSlot
from job_service.domain import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    CreditBalance,
    EventType,
    GenerationFailure,
    InputRef,
    Job,
    JobEvent,
    JobStatus,
    ModelInfo,
    Params,
    Principal,
    Template,
)
from job_service.notifications import JobNotifications
from job_service.page_tokens import PageTokens
from job_service.store import CreatedJob, CreateRules, JobStore
from job_service.templates import render
from job_service.webhook_store import DeliveryRecord, WebhookStore
from job_service.webhooks import DEFAULT_EVENTS, WebhookPolicy, event_violations, url_violations

log = structlog.get_logger(__name__)

# Static limits, for when the generator's catalogue cannot be read: every value some model takes (the generator
# re-validates each attempt against the model's own list).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9", "1:4", "4:1", "1:8", "8:1")
IMAGE_SIZES = ("1K", "2K", "4K")
PERSON_GENERATION = ("dont_allow", "allow_adult", "allow_all")
MIME_TYPES = ("image/png", "image/jpeg")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# C0 control characters other than tab, newline and carriage return. NUL in particular cannot be stored
# in a PostgreSQL text column at all, so it must be refused here rather than fail in the database.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_NAME_CHARS = 128  # model and template ids
MAX_SAMPLE_COUNT = 4  # images per job, whatever more a model could make
MAX_SEED = 2_147_483_647  # Imagen's seed is a positive int32
MAX_NEGATIVE_PROMPT_CHARS = 1_000
MAX_GRANT = 1_000_000_000
MAX_REASON_CHARS = 200
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MIN_START_WITHIN_SECONDS = 1.0
MAX_START_WITHIN_SECONDS = 7 * 86_400.0


class ModelCatalog(Protocol):
    async def list_models(self) -> dict[str, ModelInfo]: ...


class Deletions(Protocol):
    """Marks a job deleted and queues its objects (job_service.retention.RetentionStore)."""

    async def mark_deleted(self, job_id: str) -> bool | None: ...


@dataclass(frozen=True)
class JobPolicy:
    """The rules CreateJob applies, from settings."""

    default_model: str
    max_prompt_chars: int
    active_jobs_per_user: int
    max_attempts: int
    default_price_per_image: int
    model_prices: Mapping[str, int]
    new_user_credits: int
    # The welcome grant of a Supabase anonymous user (is_anonymous): a sign-in anyone can repeat at will.
    anonymous_user_credits: int = 0
    # What a webhook URL may be; None: webhooks are off (no signing secret is configured).
    webhooks: WebhookPolicy | None = None
    # Priorities (0-9): the default and the most a user may ask for, and the same for premium accounts; the service
    # role may set any.
    priority_default: int = DEFAULT_PRIORITY
    priority_max: int = DEFAULT_PRIORITY
    premium_priority_default: int = DEFAULT_PRIORITY
    premium_priority_max: int = 7
    # A waiting job gains one step of priority per this many seconds (the bound on a low priority's wait).
    priority_aging_seconds: float = 60.0
    # Jobs a user may create per window (0: unlimited): users, premium users, the service role acting for a user.
    create_rate_per_user: int = 0
    create_rate_premium: int = 0
    create_rate_service_role: int = 0
    create_rate_window_seconds: float = 60.0
    # Inline input images: most bytes and pixels each (Google takes 7 MB per inline image).
    max_input_image_bytes: int = 7 * 1024 * 1024
    max_input_image_pixels: int = 25_000_000

    def rules_for(self, principal: Principal) -> CreateRules:
        """What imagegen_create_job_v5 applies to this caller's create."""
        if principal.is_service:
            priorities = (self.priority_default, MAX_PRIORITY, self.premium_priority_default, MAX_PRIORITY)
            rates = (self.create_rate_service_role, self.create_rate_service_role)
        else:
            priorities = (
                self.priority_default,
                self.priority_max,
                self.premium_priority_default,
                self.premium_priority_max,
            )
            rates = (self.create_rate_per_user, self.create_rate_premium)
        return CreateRules(
            priority_rules=priorities,
            aging_seconds=self.priority_aging_seconds,
            rate_limits=rates if any(rates) else None,
            rate_window_seconds=self.create_rate_window_seconds,
        )


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


# More distinct webhook events than there are is a client bug: one violation, not one per entry.
MAX_WEBHOOK_EVENTS = 16


@dataclass(frozen=True)
class InputImageInput:
    """One input image as CreateJob got it: inline bytes, or (job_id, index) of one of the caller's images."""

    data: bytes = b""
    job_id: str = ""
    index: int = 0


MAX_INPUT_IMAGES = 16  # whatever the model: more are refused before any is looked at
_INPUT_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def sniff_image(data: bytes, max_pixels: int) -> tuple[str, int, int] | str:
    """(media type, width, height) read from the bytes themselves, or why they are not an acceptable image.

    Only the header is decoded (and the file's structure verified), never the pixels: the bound on pixels is checked
    from the header first, so a small file declaring a huge image costs nothing. Blocking: run it in a thread.
    """
    try:
        with Image.open(io.BytesIO(data), formats=list(_INPUT_FORMATS)) as image:
            width, height = image.size
            kind = _INPUT_FORMATS.get(image.format or "")
            if kind is None:
                return "must be a PNG, JPEG or WebP image"
            if width * height > max_pixels:
                return f"{width}x{height} is more than {max_pixels} pixels"
            image.verify()
    except Image.DecompressionBombError:  # a header declaring over twice Pillow's own limit: refused by Image.open
        return f"more than {max_pixels} pixels"
    except Exception:  # Pillow raises many kinds (OSError, SyntaxError, struct.error, ...) for bad bytes
        return "must be a PNG, JPEG or WebP image"
    return kind, width, height


def not_found(job_id: str) -> ServiceError:
    # The same answer whether the job does not exist or belongs to someone else.
    return ServiceError(ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"job {job_id} not found")


def _bad_text(value: str, max_chars: int | None = None) -> str | None:
    """Why a free-text field is unacceptable, or None."""
    if _CONTROL_CHARS.search(value):
        return "must not contain control characters"
    if max_chars is not None and len(value) > max_chars:
        return f"at most {max_chars} characters"
    return None


def parse_uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise invalid_argument([FieldViolation(field, "must be a UUID")]) from None


class CreateDispatch(Protocol):
    """The dispatcher, as CreateJob sees it: room to claim a job as it is created, and the run of a job so claimed
    (Dispatcher)."""

    def reserve(self) -> DispatchSlot | None: ...

    def adopt(self, slot: DispatchSlot, job: Job) -> None: ...

    def release(self, slot: DispatchSlot) -> None: ...


class JobManager:
    def __init__(
        self,
        store: JobStore,
        models: ModelCatalog,
        notifications: JobNotifications,
        policy: JobPolicy,
        page_tokens: PageTokens,
        deletions: Deletions,
        dispatcher: CreateDispatch | None = None,
        deletion_queued: Callable[[], None] = lambda: None,
        webhooks: WebhookStore | None = None,
    ) -> None:
        self._store = store
        self._deletions = deletions
        # Told when DeleteJob marked a job: the retention and storage sweepers are woken, not left to their interval.
        self._deletion_queued = deletion_queued
        self._webhooks = webhooks
        self._page_tokens = page_tokens
        self._models = models
        self._notifications = notifications
        self._policy = policy
        self._dispatcher = dispatcher
        # Creates that go on after their caller was cancelled: referenced until they end (the loop holds tasks weakly).
        self._creating: set[asyncio.Task[CreatedJob]] = set()

    # -- who acts for whom ----------------------------------------------------------------------

    def _acting_user(self, principal: Principal, user_id: str, field: str = "user_id") -> str:
        if principal.is_service:
            if not user_id:
                raise invalid_argument([FieldViolation(field, "required for service-role callers")])
            return parse_uuid(user_id, field)
        if user_id and user_id != principal.subject:
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                "SERVICE_ROLE_REQUIRED",
                f"only service-role callers may set {field}",
            )
        return principal.subject

    def _welcome_credits(self, principal: Principal) -> int:
        """The welcome grant for an account opened by this caller's call.

        An anonymous sign-in costs nothing and can be repeated for ever, so it gets its own (default 0) grant;
        a service-role caller acting for a user cannot tell, and the account gets the normal one.
        """
        if principal.is_anonymous and not principal.is_service:
            return self._policy.anonymous_user_credits
        return self._policy.new_user_credits

    async def _owned_job(self, principal: Principal, job_id: str) -> Job:
        job_uuid = parse_uuid(job_id, "job_id")
        job = await self._store.get_job(job_uuid)
        # A deleted job is no one's to read or act on (its row waits only for its objects to go).
        if job is None or job.deleted_at is not None or (not principal.is_service and job.user_id != principal.subject):
            raise not_found(job_id)
        return job

    # -- CreateJob --------------------------------------------------------------------------------

    async def create_job(self, principal: Principal, request: CreateJobInput) -> Job:
        user_id = self._acting_user(principal, request.user_id)
        violations: list[FieldViolation] = []
        template: Template | None = None
        prompt = request.prompt
        # Every problem of the request is reported at once: a bad name is not looked up, and the rest is
        # still checked (params against the static limits when the model cannot be named).
        bad_names = {
            name: problem
            for name, value in (("template_id", request.template_id), ("model", request.model))
            if (problem := _bad_text(value, MAX_NAME_CHARS))
        }
        violations += [FieldViolation(name, problem) for name, problem in bad_names.items()]
        if request.template_id and "template_id" not in bad_names:
            template = await self._store.get_template(request.template_id)
            if template is None:
                raise ServiceError(
                    ErrorKind.NOT_FOUND,
                    "TEMPLATE_NOT_FOUND",
                    f"template {request.template_id!r} not found; ListTemplates lists them",
                )
            if not template.is_active:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    "TEMPLATE_INACTIVE",
                    f"template {template.id!r} is not active",
                )
            if request.prompt:
                violations.append(FieldViolation("prompt", "must be empty when template_id is set"))
            variables = request.template_variables or {}
            prompt, template_violations = render(template.prompt_template, variables)
            violations += template_violations
            violations += [
                FieldViolation(f"template_variables[{name}]", problem)
                for name, value in variables.items()
                if name in template.variables and (problem := _bad_text(value))
            ]
        elif request.template_variables and not request.template_id:
            violations.append(FieldViolation("template_variables", "only allowed with template_id"))

        if "template_id" not in bad_names:  # else the prompt comes from a template that cannot be named
            violations += self._prompt_violations(prompt, template)
        if request.request_id and not _REQUEST_ID.match(request.request_id):
            violations.append(FieldViolation("request_id", "1-64 characters of A-Z a-z 0-9 _ . : -"))
        webhook, webhook_violations = self._webhook(request)
        violations += webhook_violations
        if request.priority is not None and not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
            violations.append(FieldViolation("priority", f"must be {MIN_PRIORITY}-{MAX_PRIORITY}"))
        if request.start_within is not None and not (
            MIN_START_WITHIN_SECONDS <= request.start_within <= MAX_START_WITHIN_SECONDS
        ):
            violations.append(FieldViolation("start_within", "must be between 1 second and 7 days"))

        model = request.model or (template.model if template and template.model else self._policy.default_model)
        params = self._merge_params(request, template)
        count_is_default = "sample_count" not in request.params_set and not (
            template and "sample_count" in template.default_params
        )
        person_is_default = "person_generation" not in request.params_set and not (
            template and "person_generation" in template.default_params
        )
        params, model_violations = await self._check_model(
            model, params, count_is_default, look_up="model" not in bad_names, person_is_default=person_is_default
        )
        violations += model_violations
        inputs, blobs, input_violations = await self._check_inputs(user_id, model, request.input_images)
        violations += input_violations
        if violations:
            raise invalid_argument(violations)
        if inputs:
            params = replace(params, input_images=inputs)
            if blobs:
                # Stored before the job that names them, so its first attempt finds them (see the migration).
                await self._store.put_input_blobs(user_id, blobs)

        price = (
            template.price_per_image
            if template and template.price_per_image is not None
            else self._policy.model_prices.get(model, self._policy.default_price_per_image)
        )
        identity: list[object] = [prompt, model, params.as_dict(), request.template_id]
        # Each addition only when set, so the digest of a request without it is the one it always was (a replay
        # across an upgrade stays a replay).
        if webhook is not None:
            identity.append(webhook)
        if request.priority is not None or request.start_within is not None:
            identity += [request.priority, request.start_within]
        request_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        # With room in this replica, the job is claimed for it in the transaction that creates it, and runs here.
        slot = self._dispatcher.reserve() if self._dispatcher is not None else None
        create = self._store.create_job(
            user_id=user_id,
            prompt=prompt,
            model=model,
            params=params,
            template_id=template.id if template else None,
            request_id=request.request_id or None,
            request_hash=request_hash,
            price_per_image=price,
            max_attempts=self._policy.max_attempts,
            active_limit=self._policy.active_jobs_per_user,
            new_user_credits=self._welcome_credits(principal),
            claim=slot.claim if slot is not None else None,
            webhook=webhook,
            priority=request.priority,
            start_within=request.start_within,
            rules=self._policy.rules_for(principal),
        )
        # The create goes on if the caller is cancelled meanwhile (a CreateJob whose client went away): the job is
        # made all the same, and one it claimed runs here instead of waiting for its lease to run out.
        creating = asyncio.ensure_future(self._run_if_claimed(slot, create))
        self._creating.add(creating)
        creating.add_done_callback(self._creating.discard)
        made = await asyncio.shield(creating)
        job = made.job  # as its 'created' event left it (JOB_STATE_PENDING), or the earlier job for a replay
        if job.deleted_at is not None:
            # A replay whose job was deleted since (its row waits for its objects to go): not shown any more, and
            # no new job either, which a retry of a create that did commit must never make.
            raise ServiceError(
                ErrorKind.ALREADY_EXISTS,
                "JOB_DELETED",
                f"request_id {request.request_id!r} made a job that has since been deleted; use a new request_id",
            )
        return job

    async def _run_if_claimed(self, slot: DispatchSlot | None, create: Awaitable[CreatedJob]) -> CreatedJob:
        """Awaits `create`, then has the dispatcher run the job it claimed with `slot`, or gives the slot back."""
        claimed: Job | None = None
        try:
            made = await create
            claimed = made.claimed
            return made
        finally:
            if slot is not None and self._dispatcher is not None:
                if claimed is not None:
                    self._dispatcher.adopt(slot, claimed)
                else:
                    self._dispatcher.release(slot)

    def _webhook(self, request: CreateJobInput) -> tuple[dict[str, object] | None, list[FieldViolation]]:
        """The job's webhook ({"url", "events"}) as it is stored, or None; and what is wrong with the request's."""
        if not request.webhook_url:
            if request.webhook_events:
                return None, [FieldViolation("webhook_events", "only allowed with webhook_url")]
            return None, []
        if self._policy.webhooks is None:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "WEBHOOKS_DISABLED",
                "this service sends no webhooks (no JOB_WEBHOOK_SECRETS is configured)",
            )
        violations = url_violations(request.webhook_url, self._policy.webhooks)
        events = sorted(set(request.webhook_events))
        if len(events) > MAX_WEBHOOK_EVENTS:
            violations.append(FieldViolation("webhook_events", f"at most {MAX_WEBHOOK_EVENTS} distinct events"))
        else:
            violations += event_violations(events)
        chosen = events or sorted(e.value for e in DEFAULT_EVENTS)
        return {"url": request.webhook_url, "events": chosen}, violations

    async def _check_inputs(
        self, user_id: str, model: str, images: tuple[InputImageInput, ...]
    ) -> tuple[tuple[InputRef, ...], list[tuple[str, str, bytes]], list[FieldViolation]]:
        """The input images checked: their refs (for the job's params), the inline bytes to store, the problems."""
        if not images:
            return (), [], []
        if len(images) > MAX_INPUT_IMAGES:
            return (), [], [FieldViolation("input_images", f"at most {MAX_INPUT_IMAGES}")]
        violations: list[FieldViolation] = []
        try:
            info = (await self._models.list_models()).get(model)
        except GenerationFailure:
            info = None  # the generator re-checks the count at the attempt
        if info is not None and len(images) > info.max_input_images:
            limit = f"at most {info.max_input_images}" if info.max_input_images else "no input images"
            violations.append(FieldViolation("input_images", f"{model} takes {limit}"))
        refs: list[InputRef] = []
        blobs: dict[str, tuple[str, str, bytes]] = {}
        policy = self._policy
        for i, image in enumerate(images):
            field = f"input_images[{i}]"
            if image.job_id:
                ref, problem = await self._referenced_image(user_id, image.job_id, image.index)
                if problem:
                    violations.append(FieldViolation(f"{field}.job_image", problem))
                elif ref is not None:
                    refs.append(ref)
                continue
            if not image.data:
                violations.append(FieldViolation(field, "needs data or job_image"))
                continue
            if len(image.data) > policy.max_input_image_bytes:
                violations.append(FieldViolation(f"{field}.data", f"at most {policy.max_input_image_bytes} bytes"))
                continue
            sniffed = await asyncio.to_thread(sniff_image, image.data, policy.max_input_image_pixels)
            if isinstance(sniffed, str):
                violations.append(FieldViolation(f"{field}.data", sniffed))
                continue
            kind, width, height = sniffed
            digest = hashlib.sha256(image.data).hexdigest()
            blobs[digest] = (digest, kind, image.data)
            refs.append(InputRef(kind, width, height, len(image.data), sha256=digest))
        return tuple(refs), list(blobs.values()), violations

    async def _referenced_image(self, user_id: str, job_id: str, index: int) -> tuple[InputRef | None, str]:
        """One of the user's delivered images, by job and index; the same answer whether the job is missing or
        another user's (it says nothing of other users' jobs)."""
        try:
            job_uuid = str(uuid.UUID(job_id))
        except ValueError:
            return None, "job_id must be a UUID"
        job = await self._store.get_job(job_uuid)
        # A deleted job (DeleteJob) is no one's any more, as GetJob answers; it is not named as deleted either.
        if job is None or job.user_id != user_id or job.deleted_at is not None:
            return None, f"no job {job_uuid} of yours"
        if job.images_deleted_at is not None:
            # Its objects are gone or going (retention): refused here, not after credits were reserved and an
            # attempt failed on the missing object.
            return None, f"the images of job {job_uuid} were deleted (retention)"
        image = next((i for i in job.images if i.index == index), None)
        if image is None:
            return None, f"job {job_uuid} has no image {index}"
        return (
            InputRef(
                image.mime_type,
                image.width,
                image.height,
                image.size_bytes,
                job_id=job_uuid,
                index=index,
                storage_path=image.storage_path,
            ),
            "",
        )

    def _prompt_violations(self, prompt: str, template: Template | None) -> list[FieldViolation]:
        if not prompt.strip():
            return [FieldViolation("prompt", "required (or set template_id)")]
        if len(prompt) > self._policy.max_prompt_chars:
            field = "prompt" if not template else "template_variables"
            return [FieldViolation(field, f"the prompt may have at most {self._policy.max_prompt_chars} characters")]
        if not template and _CONTROL_CHARS.search(prompt):
            return [FieldViolation("prompt", "must not contain control characters")]
        return []

    def _merge_params(self, request: CreateJobInput, template: Template | None) -> Params:
        """Request over template defaults over the documented defaults."""
        merged = Params()
        if template:
            merged = replace(merged, **template.default_params)  # type: ignore[arg-type]
        if request.params is not None:
            explicit = {name: getattr(request.params, name) for name in request.params_set}
            merged = replace(merged, **explicit)
        return merged

    async def _check_model(
        self,
        model: str,
        params: Params,
        count_is_default: bool,
        *,
        look_up: bool = True,
        person_is_default: bool = True,
    ) -> tuple[Params, list[FieldViolation]]:
        """The params (defaults fitted to the model) and what the model cannot do.

        Every check reads the generator's declaration of the model (ModelInfo): a parameter it does not honour is
        refused naming the model and the field, never dropped. With `look_up` false (a model name that is itself
        invalid) only the static limits are checked.
        """
        violations: list[FieldViolation] = []
        catalog: dict[str, ModelInfo] | None = None
        try:
            if look_up:
                catalog = await self._models.list_models()
        except GenerationFailure as failure:
            # Cannot ask the generator now: check the static limits; it re-validates each attempt.
            log.warning("model catalogue unavailable; static validation only", error=failure.message)
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
        violations += self._optional_violations(model, params, info)
        return params, violations

    @staticmethod
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
        check("negative_prompt", _bad_text(params.negative_prompt, MAX_NEGATIVE_PROMPT_CHARS))
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

    async def list_models(self) -> list[tuple[ModelInfo, int]]:
        """Every model a job can use, with its price per delivered image in credits (JOB_MODEL_PRICES, else the
        default price), from the generator's cached catalogue."""
        try:
            catalog = await self._models.list_models()
        except GenerationFailure as failure:
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "MODELS_UNAVAILABLE",
                f"the model list cannot be read from the generator now; try again ({failure.message[:200]})",
            ) from None
        return [
            (info, self._policy.model_prices.get(info.id, self._policy.default_price_per_image))
            for info in catalog.values()
        ]

    # -- reading ------------------------------------------------------------------------------------

    async def get_job(self, principal: Principal, job_id: str) -> Job:
        return await self._owned_job(principal, job_id)

    async def list_jobs(
        self, principal: Principal, *, page_size: int, page_token: str, status: JobStatus | None, user_id: str
    ) -> tuple[list[Job], str]:
        owner = self._acting_user(principal, user_id)
        if page_size < 0:
            raise invalid_argument([FieldViolation("page_size", "must not be negative")])
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        status_name = status.value if status else ""
        after = self._page_tokens.decode(page_token, owner, status_name) if page_token else None
        jobs = await self._store.list_jobs(owner, status=status, after=after, limit=size + 1)
        last = jobs[size - 1] if len(jobs) > size else None
        next_token = self._page_tokens.encode(last.created_at, last.id, owner, status_name) if last else ""
        return jobs[:size], next_token

    async def watch(self, principal: Principal, job_id: str) -> AsyncIterator[tuple[Job, JobEvent | None]]:
        """The job now, then (job, event) for each event after it, ending after a terminal state."""
        job_uuid = parse_uuid(job_id, "job_id")
        # Subscribe before reading the snapshot: nothing committed after the snapshot can be missed.
        subscription = self._notifications.subscribe(job_uuid)
        try:
            job = await self._owned_job(principal, job_id)
            last, ended = job.last_event_seq, job.status.terminal
            yield job, None
            # Not kept for the stream's life (a job object for each of thousands of watchers): each update
            # carries the job as it is then.
            del job
            if ended:
                return
            subscription.start_from(last)
            while True:
                current, event = await subscription.queue.get()
                if event.seq <= last:
                    continue
                last = event.seq
                yield current, event
                if event.status.terminal:
                    return
        finally:
            subscription.close()

    async def webhook_deliveries(self, principal: Principal, job_id: str) -> list[DeliveryRecord]:
        job = await self._owned_job(principal, job_id)
        if self._webhooks is None:
            return []
        return await self._webhooks.for_job(job.id)

    # -- CancelJob --------------------------------------------------------------------------------

    async def cancel_job(self, principal: Principal, job_id: str) -> Job:
        return await self._cancel(principal, job_id, finished_ok=False)

    async def _cancel(self, principal: Principal, job_id: str, *, finished_ok: bool) -> Job:
        for _ in range(5):  # the job can move between our read and our write; a few rounds settle it
            job = await self._owned_job(principal, job_id)
            if job.status.terminal and finished_ok:
                return job
            if job.status.terminal:
                raise ServiceError(
                    ErrorKind.FAILED_PRECONDITION,
                    "JOB_ALREADY_FINISHED",
                    f"job {job.id} is already {job.status.value}",
                )
            if job.status is JobStatus.PENDING:
                updated = await self._store.advance(
                    job.id,
                    attempt=None,
                    from_statuses=(JobStatus.PENDING,),
                    event=EventType.CANCELLED,
                    to=JobStatus.CANCELLED,
                    message="cancelled by the user",
                )
            elif job.cancel_requested:
                return job
            else:
                updated = await self._store.advance(
                    job.id,
                    attempt=job.attempt,
                    from_statuses=(JobStatus.GENERATING,),
                    event=EventType.CANCEL_REQUESTED,
                    cancel_requested=True,
                    message="cancel requested",
                )
            if updated is not None:
                log.info("cancel", job_id=job.id, status=updated.status.value)
                return updated
        raise ServiceError(ErrorKind.UNAVAILABLE, "JOB_BUSY", "the job kept changing; try again")

    # -- DeleteJob ----------------------------------------------------------------------------------

    async def delete_job(self, principal: Principal, job_id: str) -> None:
        """Cancels the job if it still runs (the cancel path: what was delivered is charged), then marks it deleted.

        From then on it answers NOT_FOUND; its objects are queued for deletion now if it has ended (else by the
        retention pass once it has), and its row goes after them. A job already deleted answers NOT_FOUND.
        """
        job = await self._cancel(principal, job_id, finished_ok=True)
        ended = await self._deletions.mark_deleted(job.id)
        if ended is None:  # deleted meanwhile by another call
            raise not_found(job_id)
        log.info("job deleted", job_id=job.id, user_id=job.user_id, objects_queued=ended)
        self._deletion_queued()

    # -- templates and credits ------------------------------------------------------------------------

    async def list_templates(self) -> list[Template]:
        return await self._store.list_templates()

    async def credit_balance(self, principal: Principal, user_id: str) -> CreditBalance:
        owner = self._acting_user(principal, user_id)
        return await self._store.credit_balance(owner, self._welcome_credits(principal))

    async def grant_credits(
        self,
        principal: Principal,
        user_id: str,
        amount: int,
        reason: str,
        premium: bool | None,
        request_id: str = "",
    ) -> tuple[int, bool]:
        if not principal.is_service:
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED,
                "SERVICE_ROLE_REQUIRED",
                "only service-role callers may grant credits",
            )
        violations = []
        if not user_id:
            violations.append(FieldViolation("user_id", "required"))
        if not 1 <= amount <= MAX_GRANT:
            violations.append(FieldViolation("amount", f"must be 1-{MAX_GRANT}"))
        if problem := _bad_text(reason, MAX_REASON_CHARS):
            violations.append(FieldViolation("reason", problem))
        if request_id and not _REQUEST_ID.match(request_id):
            violations.append(FieldViolation("request_id", "1-64 characters of A-Z a-z 0-9 _ . : -"))
        if violations:
            raise invalid_argument(violations)
        owner = parse_uuid(user_id, "user_id")
        balance, is_premium, granted = await self._store.grant_credits(
            owner, amount, reason or "grant", premium, self._policy.new_user_credits, request_id or None
        )
        if granted:
            log.info("credits granted", user_id=owner, amount=amount, balance=balance)
        else:
            log.info("credit grant replayed", user_id=owner, amount=amount, request_id=request_id)
        return balance, is_premium
