"""JobService over gRPC: authenticate, convert protobuf <-> domain, call JobManager. Nothing else."""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf import timestamp_pb2
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_common.decoding import decoded
from imagegen_common.errors import FieldViolation, invalid_argument
from imagegen_common.grpc_errors import stream_errors, unary_errors
from imagegen_common.rpc_observability import peer_of
from job_service.auth import TokenVerifier
from job_service.create_request import MAX_SAMPLE_COUNT, CreateJobInput, InputImageInput
from job_service.domain import Job, JobEvent, JobEventType, JobState, Params, Principal, StoredImage, Template
from job_service.input_budget import InputImageBudget
from job_service.jobs import MAX_INPUT_IMAGES, JobManager
from job_service.store import CONNECTION_ERRORS
from job_service.watch_limits import WatchStreams
from job_service.webhook_store import DeliveryRecord
from job_service.webhooks import WebhookEvent, message_id

DOMAIN = "imagegen.job.v1"

_STATE_TO_PB = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.GENERATING: pb.JOB_STATE_GENERATING,
    JobState.COMPLETED: pb.JOB_STATE_COMPLETED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
    JobState.EXPIRED: pb.JOB_STATE_EXPIRED,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_EVENT_TO_PB = {
    JobEventType.CREATED: pb.JOB_EVENT_TYPE_CREATED,
    JobEventType.ATTEMPT_STARTED: pb.JOB_EVENT_TYPE_ATTEMPT_STARTED,
    JobEventType.GENERATION_STARTED: pb.JOB_EVENT_TYPE_GENERATION_STARTED,
    JobEventType.IMAGE_STORED: pb.JOB_EVENT_TYPE_IMAGE_STORED,
    JobEventType.COMPLETED: pb.JOB_EVENT_TYPE_COMPLETED,
    JobEventType.RETRY_SCHEDULED: pb.JOB_EVENT_TYPE_RETRY_SCHEDULED,
    JobEventType.FAILED: pb.JOB_EVENT_TYPE_FAILED,
    JobEventType.CANCEL_REQUESTED: pb.JOB_EVENT_TYPE_CANCEL_REQUESTED,
    JobEventType.CANCELLED: pb.JOB_EVENT_TYPE_CANCELLED,
    JobEventType.LEASE_EXPIRED: pb.JOB_EVENT_TYPE_LEASE_EXPIRED,
    JobEventType.HANDED_BACK: pb.JOB_EVENT_TYPE_HANDED_BACK,
    JobEventType.EXPIRED: pb.JOB_EVENT_TYPE_EXPIRED,
}
_WEBHOOK_EVENT_TO_PB = {
    WebhookEvent.STARTED: pb.WEBHOOK_EVENT_STARTED,
    WebhookEvent.IMAGE_STORED: pb.WEBHOOK_EVENT_IMAGE_STORED,
    WebhookEvent.COMPLETED: pb.WEBHOOK_EVENT_COMPLETED,
    WebhookEvent.FAILED: pb.WEBHOOK_EVENT_FAILED,
    WebhookEvent.CANCELLED: pb.WEBHOOK_EVENT_CANCELLED,
    WebhookEvent.EXPIRED: pb.WEBHOOK_EVENT_EXPIRED,
}
_WEBHOOK_EVENT_FROM_PB = {v: k.value for k, v in _WEBHOOK_EVENT_TO_PB.items()}
_DELIVERY_STATE_TO_PB = {
    "pending": pb.WEBHOOK_DELIVERY_STATE_PENDING,
    "delivered": pb.WEBHOOK_DELIVERY_STATE_DELIVERED,
    "failed": pb.WEBHOOK_DELIVERY_STATE_FAILED,
}
# Every state with an error to show: why it failed, was cancelled or expired; on a pending job, the error of the
# last attempt, which will be retried.
_STATES_WITH_ERROR = (JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED, JobState.PENDING)
_PARAM_FIELDS = (
    "sample_count",
    "aspect_ratio",
    "image_size",
    "person_generation",
    "output_mime_type",
    "negative_prompt",
    "safety_setting",
    "language",
    "jpeg_quality",
)
# proto3 `optional` fields: set when present, whatever the value (add_watermark=false is a choice).
_OPTIONAL_PARAM_FIELDS: tuple[Literal["seed", "add_watermark", "enhance_prompt"], ...] = (
    "seed",
    "add_watermark",
    "enhance_prompt",
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _stamp(value: datetime) -> timestamp_pb2.Timestamp:
    # Integer arithmetic on the timedelta: Timestamp.FromDatetime goes through utctimetuple() and
    # calendar.timegm, three times slower, and a WatchJob message carries five of these per event.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # naive means UTC, as for FromDatetime
    since = value - _EPOCH
    return timestamp_pb2.Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000)


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else _stamp(value)


def params_to_pb(params: Params | dict[str, Any]) -> pb.GenerationParams:
    values: dict[str, Any] = params.as_dict() if isinstance(params, Params) else params
    fields = (*_PARAM_FIELDS, *_OPTIONAL_PARAM_FIELDS)
    return pb.GenerationParams(**{k: v for k, v in values.items() if k in fields and v is not None})


def _image_to_pb(image: StoredImage, *, deleted: bool) -> pb.Image:
    message = pb.Image(**image.__dict__)
    if deleted:
        # Gone (or going) from storage: no URL that would answer 404; the rest still says what there was.
        message.url = ""
    return message


def job_to_pb(job: Job) -> pb.Job:
    message = pb.Job(
        id=job.id,
        user_id=job.user_id,
        state=_STATE_TO_PB[job.status],
        prompt=job.prompt,
        model=job.model,
        params=params_to_pb(job.params),
        template_id=job.template_id or "",
        request_id=job.request_id or "",
        images=[_image_to_pb(image, deleted=job.images_deleted_at is not None) for image in job.images],
        filtered_count=job.filtered_count,
        filtered_reasons=job.filtered_reasons,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        credits_reserved=job.credits_reserved,
        credits_charged=job.credits_charged,
        cancel_requested=job.cancel_requested,
        create_time=_timestamp(job.created_at),
        start_time=_timestamp(job.started_at),
        update_time=_timestamp(job.updated_at),
        end_time=_timestamp(job.completed_at),
        images_delete_time=_timestamp(job.images_deleted_at),
        webhook_url=job.webhook_url or "",
        webhook_events=[
            _WEBHOOK_EVENT_TO_PB[WebhookEvent(name)]
            for name in job.webhook_events or ()
            if name in _WEBHOOK_EVENT_NAMES
        ],
        priority=job.priority,
        start_deadline=_timestamp(job.start_deadline),
    )
    if job.error_code and job.status in _STATES_WITH_ERROR:
        message.error.CopyFrom(pb.JobError(reason=job.error_code, message=job.error_message or ""))
    if job.status is JobState.PENDING:
        message.next_attempt_time.CopyFrom(_stamp(job.next_attempt_at))
    for position, ref in enumerate(job.params.input_images):
        shown = message.input_images.add(
            index=position,
            mime_type=ref.mime_type,
            width=ref.width,
            height=ref.height,
            size_bytes=ref.size_bytes,
            sha256=ref.sha256,
        )
        if ref.job_id:
            shown.job_image.CopyFrom(pb.ImageRef(job_id=ref.job_id, index=ref.index))
    parent = job.params.parent
    if parent is not None:
        message.parent_job_id = parent.job_id
        message.parent_image_index = parent.index
    return message


_WEBHOOK_EVENT_NAMES = frozenset(e.value for e in WebhookEvent)


def delivery_to_pb(record: DeliveryRecord) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        id=message_id(record.id),
        event=_WEBHOOK_EVENT_TO_PB.get(WebhookEvent(record.type), pb.WEBHOOK_EVENT_UNSPECIFIED)
        if record.type in _WEBHOOK_EVENT_NAMES
        else pb.WEBHOOK_EVENT_UNSPECIFIED,
        event_seq=record.seq,
        state=_DELIVERY_STATE_TO_PB.get(record.state, pb.WEBHOOK_DELIVERY_STATE_UNSPECIFIED),
        attempts=[
            pb.WebhookAttempt(
                attempt=a.attempt,
                time=_stamp(a.at),
                http_status=a.http_status or 0,
                error=a.error,
                duration_seconds=a.duration_seconds,
            )
            for a in record.attempts
        ],
        create_time=_stamp(record.created_at),
        end_time=_timestamp(record.ended_at),
        next_attempt_time=_timestamp(record.next_attempt_at),
        last_error=record.last_error,
    )


def event_to_pb(event: JobEvent) -> pb.JobEvent:
    return pb.JobEvent(
        seq=event.seq,
        type=_EVENT_TO_PB[event.type],
        state=_STATE_TO_PB[event.status],
        time=_timestamp(event.at),
        message=event.message,
        attempt=event.attempt,
    )


def template_to_pb(template: Template) -> pb.Template:
    return pb.Template(
        id=template.id,
        name=template.name,
        description=template.description,
        prompt_template=template.prompt_template,
        variables=template.variables,
        model=template.model,
        default_params=params_to_pb(template.default_params),
        price_per_image=template.price_per_image or 0,
    )


class _WatchResponses:
    """WatchJob messages made once per (job, event) and shared by every stream watching that job.

    A job's watchers all receive the very same (job, event) objects from its feed; converting them once
    instead of once per watcher keeps a fan-out to many watchers from costing a conversion per stream.
    An entry lives as long as its event object, which the job's watchers hold until they have moved past
    it: nothing is kept for events every watcher is done with (an LRU of them was about 6 MB with 2,000
    jobs in flight), and an id() is never reused while its entry exists.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[JobEvent], Job, pb.WatchJobResponse]] = {}

    def get(self, job: Job, event: JobEvent) -> pb.WatchJobResponse:
        key = id(event)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is event and entry[1] is job:
            return entry[2]
        response = pb.WatchJobResponse(job=job_to_pb(job), event=event_to_pb(event))
        self._entries[key] = (weakref.ref(event, functools.partial(self._drop, key)), job, response)
        return response

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: int, ref: weakref.ref[JobEvent]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] is ref:
            del self._entries[key]


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(
        self,
        jobs: JobManager,
        verifier: TokenVerifier,
        watch_streams: WatchStreams,
        input_budget: InputImageBudget | None = None,
    ) -> None:
        self._jobs = jobs
        self._input_budget = input_budget or InputImageBudget(0)
        self._verifier = verifier
        self._watch_streams = watch_streams
        self._watch_responses = _WatchResponses()

    def cached_watch_responses(self) -> int:
        return len(self._watch_responses)

    async def _principal(self, context: Any, request: object) -> Principal:
        """The caller, from its token; then, only for a caller let in, INVALID_ARGUMENT if its body did not parse."""
        metadata = dict(context.invocation_metadata() or ())
        principal = await self._verifier.verify_header(metadata.get("authorization"), metadata.get("apikey"))
        decoded(request)
        return principal

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.CreateJobResponse:
        principal = await self._principal(context, request)
        has_params = request.HasField("params")
        params_set = frozenset(
            [name for name in _PARAM_FIELDS if has_params and getattr(request.params, name)]
            + [name for name in _OPTIONAL_PARAM_FIELDS if has_params and request.params.HasField(name)]
        )
        inputs = tuple(
            InputImageInput(job_id=i.job_image.job_id, index=i.job_image.index)
            if i.HasField("job_image")
            else InputImageInput(data=i.data)
            for i in request.input_images[: MAX_INPUT_IMAGES + 1]  # more is refused anyway; look at no more
        )
        params = Params(**{name: getattr(request.params, name) for name in params_set}) if params_set else None
        start_within: float | None = None
        if request.HasField("start_within"):
            span = request.start_within
            # A positive Duration has seconds >= 0 and nanos in [0, 1e9); anything else (negative, or not a valid
            # Duration at all) becomes -1, which the range check refuses.
            valid = span.seconds >= 0 and 0 <= span.nanos < 1_000_000_000
            start_within = span.seconds + span.nanos / 1e9 if valid else -1.0
        inline_bytes = sum(len(i.data) for i in inputs)
        job = await self._input_budget.run(
            inline_bytes,
            lambda: self._jobs.create_job(
                principal,
                CreateJobInput(
                    prompt=request.prompt,
                    model=request.model,
                    params=params,
                    params_set=params_set,
                    template_id=request.template_id,
                    template_variables=dict(request.template_variables),
                    request_id=request.request_id,
                    user_id=request.user_id,
                    webhook_url=request.webhook_url,
                    # proto3 enums are open: a number this server does not know is passed on as a name the
                    # validation refuses.
                    webhook_events=tuple(
                        _WEBHOOK_EVENT_FROM_PB.get(number, f"#{number}") for number in request.webhook_events
                    ),
                    priority=request.priority if request.HasField("priority") else None,
                    start_within=start_within,
                    input_images=inputs,
                ),
            ),
        )
        return pb.CreateJobResponse(job=job_to_pb(job))

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        principal = await self._principal(context, request)
        return pb.GetJobResponse(job=job_to_pb(await self._jobs.get_job(principal, request.job_id)))

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        principal = await self._principal(context, request)
        if request.state != pb.JOB_STATE_UNSPECIFIED and request.state not in _STATE_FROM_PB:
            # proto3 enums are open: a newer or buggy client can send a number this server does not know.
            raise invalid_argument([FieldViolation("state", f"unknown job state {request.state}")])
        jobs, token = await self._jobs.list_jobs(
            principal,
            page_size=request.page_size,
            page_token=request.page_token,
            status=_STATE_FROM_PB.get(request.state),
            user_id=request.user_id,
        )
        return pb.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs], next_page_token=token)

    @stream_errors(DOMAIN, CONNECTION_ERRORS)
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any) -> AsyncIterator[pb.WatchJobResponse]:
        principal = await self._principal(context, request)
        # Per connection by peer address (one HTTP/2 connection each); a service role acts for many users, so it
        # is counted per connection only.
        user = None if principal.is_service else principal.subject
        with self._watch_streams.holding(user, peer_of(context)):
            async for job, event in self._jobs.watch(principal, request.job_id):
                if event is None:
                    yield pb.WatchJobResponse(job=job_to_pb(job))
                else:
                    yield self._watch_responses.get(job, event)  # shared: never modified after it is made

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        principal = await self._principal(context, request)
        return pb.CancelJobResponse(job=job_to_pb(await self._jobs.cancel_job(principal, request.job_id)))

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Any) -> pb.DeleteJobResponse:
        principal = await self._principal(context, request)
        await self._jobs.delete_job(principal, request.job_id)
        return pb.DeleteJobResponse()

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def ListTemplates(self, request: pb.ListTemplatesRequest, context: Any) -> pb.ListTemplatesResponse:
        await self._principal(context, request)
        return pb.ListTemplatesResponse(templates=[template_to_pb(t) for t in await self._jobs.list_templates()])

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        await self._principal(context, request)
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    id=info.id,
                    display_name=info.display_name,
                    provider=info.provider,
                    aspect_ratios=info.aspect_ratios,
                    image_sizes=info.image_sizes,
                    max_sample_count=min(info.max_sample_count, MAX_SAMPLE_COUNT),
                    person_generation_options=info.person_generation_options,
                    max_input_images=info.max_input_images,
                    thinking=info.thinking,
                    parameters=info.parameters,
                    safety_settings=info.safety_settings,
                    languages=info.languages,
                    price_per_image=price,
                )
                for info, price in await self._jobs.list_models()
            ]
        )

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def GetCreditBalance(self, request: pb.GetCreditBalanceRequest, context: Any) -> pb.GetCreditBalanceResponse:
        principal = await self._principal(context, request)
        balance = await self._jobs.credit_balance(principal, request.user_id)
        return pb.GetCreditBalanceResponse(
            user_id=balance.user_id,
            balance=balance.balance,
            reserved=balance.reserved,
            premium=balance.premium,
        )

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def GrantCredits(self, request: pb.GrantCreditsRequest, context: Any) -> pb.GrantCreditsResponse:
        principal = await self._principal(context, request)
        balance, premium = await self._jobs.grant_credits(
            principal,
            request.user_id,
            request.amount,
            request.reason,
            request.premium if request.HasField("premium") else None,
            request.request_id,
        )
        return pb.GrantCreditsResponse(balance=balance, premium=premium)

    @unary_errors(DOMAIN, CONNECTION_ERRORS)
    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Any
    ) -> pb.ListWebhookDeliveriesResponse:
        principal = await self._principal(context, request)
        records = await self._jobs.webhook_deliveries(principal, request.job_id)
        return pb.ListWebhookDeliveriesResponse(deliveries=[delivery_to_pb(r) for r in records])
