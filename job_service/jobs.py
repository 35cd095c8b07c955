"""JobService's use cases: create, read, list, watch and cancel jobs; templates; credits. No gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog
from PIL import Image

from imagegen_common.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument
from job_service.create_request import (
    MAX_NAME_CHARS,
    REQUEST_ID,
    REQUEST_ID_RULE,
    CreateJobInput,
    InputImageInput,
    NewJob,
    RequestRules,
    bad_text,
    check_create_request,
    job_model,
)
from job_service.dispatcher import DispatchSlot
from job_service.domain import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    CreditBalance,
    GenerationFailure,
    InputRef,
    Job,
    JobEvent,
    JobState,
    ModelInfo,
    Principal,
    Template,
)
from job_service.input_holds import HeldInputs
from job_service.notifications import JobNotifications
from job_service.page_tokens import PageTokens
from job_service.state_changes import StateChange
from job_service.store import CreatedJob, CreateRules, JobStore
from job_service.webhook_store import DeliveryRecord, WebhookStore
from job_service.webhooks import WebhookPolicy

log = structlog.get_logger(__name__)

MAX_GRANT = 1_000_000_000
MAX_REASON_CHARS = 200
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


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


def parse_uuid(value: str, field: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise invalid_argument([FieldViolation(field, "must be a UUID")]) from None


class CreateDispatch(Protocol):
    """The dispatcher, as CreateJob sees it: room to claim a job as it is created, and the run of a job so claimed
    (Dispatcher)."""

    def reserve(self) -> DispatchSlot | None: ...

    def settle(self, slot: DispatchSlot, claimed: Job | None) -> None: ...


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
        # The inline images it stores are released when it ends: kept for its job, deleted if it was refused.
        async with HeldInputs(self._store) as held:
            return await self._create_job(principal, request, held)

    async def _create_job(self, principal: Principal, request: CreateJobInput, held: HeldInputs) -> Job:
        user_id = self._acting_user(principal, request.user_id)
        # What the request names is looked up here; a name that is itself invalid is not looked up (the pure step
        # reports it, and checks the params against the static limits when the model cannot be named).
        template: Template | None = None
        if request.template_id and not bad_text(request.template_id, MAX_NAME_CHARS):
            template = await self._active_template(request.template_id)
        catalog = await self._catalog() if not bad_text(request.model, MAX_NAME_CHARS) else None
        model = job_model(request, template, self._policy.default_model)
        inputs, blobs, input_violations = await self._check_inputs(user_id, model, catalog, request.input_images)
        checked = check_create_request(
            request,
            user_id=user_id,
            template=template,
            catalog=catalog,
            rules=self._request_rules(),
            inputs=inputs,
            input_violations=input_violations,
        )
        if not isinstance(checked, NewJob):
            raise invalid_argument(checked)
        if blobs:
            # Stored before the job that names them, so its first attempt finds them (see the migration).
            await held.put(user_id, blobs)
        # With room in this replica, the job is claimed for it in the transaction that creates it, and runs here.
        slot = self._dispatcher.reserve() if self._dispatcher is not None else None
        create = self._store.create_job(
            user_id=checked.user_id,
            prompt=checked.prompt,
            model=checked.model,
            params=checked.params,
            template_id=checked.template_id,
            request_id=checked.request_id,
            request_hash=checked.request_hash,
            price_per_image=checked.price_per_image,
            max_attempts=self._policy.max_attempts,
            active_limit=self._policy.active_jobs_per_user,
            new_user_credits=self._welcome_credits(principal),
            claim=slot.claim if slot is not None else None,
            webhook=checked.webhook,
            priority=checked.priority,
            start_within=checked.start_within,
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
                self._dispatcher.settle(slot, claimed)

    async def _active_template(self, template_id: str) -> Template:
        template = await self._store.get_template(template_id)
        if template is None:
            raise ServiceError(
                ErrorKind.NOT_FOUND,
                "TEMPLATE_NOT_FOUND",
                f"template {template_id!r} not found; ListTemplates lists them",
            )
        if not template.is_active:
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "TEMPLATE_INACTIVE",
                f"template {template.id!r} is not active",
            )
        return template

    async def _catalog(self) -> dict[str, ModelInfo] | None:
        """The generator's models, or None when it cannot be asked now: the static limits are checked instead,
        and the generator re-validates each attempt."""
        try:
            return await self._models.list_models()
        except GenerationFailure as failure:
            log.warning("model catalogue unavailable; static validation only", error=failure.message)
            return None

    def _request_rules(self) -> RequestRules:
        policy = self._policy
        return RequestRules(
            default_model=policy.default_model,
            max_prompt_chars=policy.max_prompt_chars,
            default_price_per_image=policy.default_price_per_image,
            model_prices=policy.model_prices,
            webhooks=policy.webhooks,
        )

    async def _check_inputs(
        self,
        user_id: str,
        model: str,
        catalog: Mapping[str, ModelInfo] | None,
        images: tuple[InputImageInput, ...],
    ) -> tuple[tuple[InputRef, ...], list[tuple[str, str, bytes]], list[FieldViolation]]:
        """The input images checked: their refs (for the job's params), the inline bytes to store, the problems.
        `catalog`: the models as CreateJob read them (None: unavailable; the generator re-checks the count at the
        attempt)."""
        if not images:
            return (), [], []
        if len(images) > MAX_INPUT_IMAGES:
            return (), [], [FieldViolation("input_images", f"at most {MAX_INPUT_IMAGES}")]
        violations: list[FieldViolation] = []
        info = catalog.get(model) if catalog is not None else None
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
        self, principal: Principal, *, page_size: int, page_token: str, status: JobState | None, user_id: str
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
            if job.status is JobState.PENDING:
                updated = await self._store.advance(
                    job.id, StateChange.cancelled(), attempt=None, from_states=(JobState.PENDING,)
                )
            elif job.cancel_requested:
                return job
            else:
                updated = await self._store.advance(
                    job.id,
                    StateChange.cancel_requested_by_user(),
                    attempt=job.attempt,
                    from_states=(JobState.GENERATING,),
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
        if problem := bad_text(reason, MAX_REASON_CHARS):
            violations.append(FieldViolation("reason", problem))
        if request_id and not REQUEST_ID.match(request_id):
            violations.append(FieldViolation("request_id", REQUEST_ID_RULE))
        if violations:
            raise invalid_argument(violations)
        owner = parse_uuid(user_id, "user_id")
        balance, is_premium, granted = await self._store.grant_credits(
            owner,
            amount,
            reason or "grant",
            premium=premium,
            new_user_credits=self._policy.new_user_credits,
            request_id=request_id or None,
        )
        if granted:
            log.info("credits granted", user_id=owner, amount=amount, balance=balance)
        else:
            log.info("credit grant replayed", user_id=owner, amount=amount, request_id=request_id)
        return balance, is_premium
