"""A typed client for JobService, for app backends and the CLI.

Every call carries a deadline; only UNAVAILABLE is retried (with backoff), and WatchJob resumes where
it left off when its stream drops, because watching is read-only.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

T = TypeVar("T")
TokenSource = Callable[[], str]
TERMINAL_STATES = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_EXPIRED)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 3.0


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel: the CA to trust (None: the system's), and a client certificate for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    # The name the server's certificate must carry, when it is not the target's host.
    server_name: str | None = None

    @classmethod
    def of(
        cls,
        secure: bool,
        root_certificates: bytes | None,
        certificate_chain: bytes | None,
        private_key: bytes | None,
        server_name: str | None,
    ) -> TlsOptions | None:
        """The options, or None for plaintext (nothing about TLS was asked for)."""
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("a client certificate needs its private key, and a key its certificate")
        if not (secure or root_certificates or certificate_chain or server_name):
            return None
        return cls(root_certificates, certificate_chain, private_key, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def new_request_id() -> str:
    """An idempotency key for one logical call: made once, sent unchanged with every retry of that call, so a retry
    after a lost answer (the service committed, the connection dropped) returns the first result, never a second."""
    return str(uuid.uuid4())


def create_job_request(
    prompt: str,
    *,
    model: str,
    sample_count: int,
    aspect_ratio: str,
    image_size: str,
    person_generation: str,
    output_mime_type: str,
    template_id: str,
    template_variables: dict[str, str] | None,
    request_id: str,
    user_id: str,
    webhook_url: str = "",
    webhook_events: Sequence[int | str] = (),
    priority: int | None = None,
    start_within: float | None = None,
    params: pb.GenerationParams | None = None,
    input_images: Sequence[pb.InputImage] = (),
) -> pb.CreateJobRequest:
    """The CreateJobRequest both clients send (unset parameters stay unset: the service's defaults apply), with a
    new request_id when the caller gave none. `start_within` is in seconds. `params` adds any other
    GenerationParams field (seed, jpeg_quality, ...) over the named ones."""
    request = pb.CreateJobRequest(
        webhook_url=webhook_url,
        webhook_events=[pb.WebhookEvent.ValueType(webhook_event(e)) for e in webhook_events],
        prompt=prompt,
        model=model,
        template_id=template_id,
        template_variables=template_variables or {},
        request_id=request_id or new_request_id(),
        user_id=user_id,
        params=pb.GenerationParams(
            sample_count=sample_count,
            aspect_ratio=aspect_ratio,
            image_size=image_size,
            person_generation=person_generation,
            output_mime_type=output_mime_type,
        ),
    )
    if priority is not None:
        request.priority = priority
    if start_within is not None:
        request.start_within.FromNanoseconds(round(start_within * 1e9))
    if params is not None:
        request.params.MergeFrom(params)
    request.input_images.extend(input_images)
    return request


def webhook_event(value: int | str) -> int:
    """A WebhookEvent from its number, its enum name, its JSON type or its short name ("completed",
    "job.completed", "WEBHOOK_EVENT_COMPLETED" and pb.WEBHOOK_EVENT_COMPLETED are one event)."""
    if isinstance(value, int):
        return value
    name = value.strip().upper().removeprefix("JOB.").replace(".", "_")
    try:
        return int(pb.WebhookEvent.Value(name if name.startswith("WEBHOOK_EVENT_") else f"WEBHOOK_EVENT_{name}"))
    except ValueError:
        raise ValueError(f"unknown webhook event {value!r}") from None


def inline_image(data: bytes) -> pb.InputImage:
    """An input image sent inline (its type is read from the bytes by the service, not from a file name)."""
    return pb.InputImage(data=data)


def job_image(job_id: str, index: int) -> pb.InputImage:
    """An input image that is one of your earlier job's images: resolved by the service, not sent again."""
    return pb.InputImage(job_image=pb.ImageRef(job_id=job_id, index=index))


def grant_credits_request(
    user_id: str, amount: int, reason: str, premium: bool | None, request_id: str = ""
) -> pb.GrantCreditsRequest:
    """The GrantCreditsRequest both clients send, with a new request_id when the caller gave none."""
    request = pb.GrantCreditsRequest(
        user_id=user_id, amount=amount, reason=reason, request_id=request_id or new_request_id()
    )
    if premium is not None:
        request.premium = premium
    return request


class JobTimeoutError(TimeoutError):
    def __init__(self, job: pb.Job) -> None:
        super().__init__(f"job {job.id} is still {pb.JobState.Name(job.state)}")
        self.job = job


class ImageGenClient:
    """Async client. `token` is a bearer JWT, or a function returning a fresh one for each call."""

    def __init__(
        self,
        target: str,
        token: str | TokenSource,
        *,
        root_certificates: bytes | None = None,
        secure: bool = False,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        tls = TlsOptions.of(secure, root_certificates, certificate_chain, private_key, server_name)
        if tls is not None:
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=tls.options())
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.JobServiceStub(self._channel)
        self._token: TokenSource = token if callable(token) else (lambda: token)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()

    async def __aenter__(self) -> ImageGenClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token()}"),)

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: object, timeout: float | None) -> T:
        delay = self._retry.initial_backoff
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return await rpc(request, timeout=timeout or self._timeout, metadata=self._metadata())
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self._retry.attempts:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self._retry.max_backoff)
        raise AssertionError("unreachable")

    async def create_job(
        self,
        prompt: str = "",
        *,
        model: str = "",
        sample_count: int = 0,
        aspect_ratio: str = "",
        image_size: str = "",
        person_generation: str = "",
        output_mime_type: str = "",
        template_id: str = "",
        template_variables: dict[str, str] | None = None,
        request_id: str = "",
        user_id: str = "",
        webhook_url: str = "",
        webhook_events: Sequence[int | str] = (),
        priority: int | None = None,
        start_within: float | None = None,
        params: pb.GenerationParams | None = None,
        input_images: Sequence[pb.InputImage] = (),
        timeout: float | None = None,
    ) -> pb.Job:
        """Creates a job. Retries (of UNAVAILABLE) resend the same `request_id`, so they never create two jobs; pass
        your own `request_id` to extend that to retries of the whole call (the same id never creates two jobs)."""
        request = create_job_request(
            prompt,
            model=model,
            sample_count=sample_count,
            aspect_ratio=aspect_ratio,
            image_size=image_size,
            person_generation=person_generation,
            output_mime_type=output_mime_type,
            template_id=template_id,
            template_variables=template_variables,
            request_id=request_id,
            user_id=user_id,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            priority=priority,
            start_within=start_within,
            params=params,
            input_images=input_images,
        )
        response: pb.CreateJobResponse = await self._call(self._stub.CreateJob, request, timeout)
        return response.job

    async def list_webhook_deliveries(self, job_id: str, *, timeout: float | None = None) -> list[pb.WebhookDelivery]:
        """The job's webhook deliveries, in event order, each with its sends and their HTTP status."""
        response: pb.ListWebhookDeliveriesResponse = await self._call(
            self._stub.ListWebhookDeliveries, pb.ListWebhookDeliveriesRequest(job_id=job_id), timeout
        )
        return list(response.deliveries)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        response: pb.GetJobResponse = await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout)
        return response.job

    async def list_jobs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: int = 0,
        user_id: str = "",
        timeout: float | None = None,
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(page_size=page_size, page_token=page_token, state=state, user_id=user_id)  # type: ignore[arg-type]
        response: pb.ListJobsResponse = await self._call(self._stub.ListJobs, request, timeout)
        return response

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        response: pb.CancelJobResponse = await self._call(
            self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout
        )
        return response.job

    async def delete_job(self, job_id: str, *, timeout: float | None = None) -> None:
        """Deletes a job and its images; a running one is cancelled first. A job already deleted (or another
        user's) raises NOT_FOUND: a call retried after UNAVAILABLE that gets NOT_FOUND found its job deleted."""
        await self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id), timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[pb.Model]:
        """The models a job can use, with their capabilities and price per image in credits."""
        response: pb.ListModelsResponse = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    async def list_templates(self, *, timeout: float | None = None) -> list[pb.Template]:
        response: pb.ListTemplatesResponse = await self._call(
            self._stub.ListTemplates, pb.ListTemplatesRequest(), timeout
        )
        return list(response.templates)

    async def credit_balance(self, user_id: str = "", *, timeout: float | None = None) -> pb.GetCreditBalanceResponse:
        response: pb.GetCreditBalanceResponse = await self._call(
            self._stub.GetCreditBalance, pb.GetCreditBalanceRequest(user_id=user_id), timeout
        )
        return response

    async def grant_credits(
        self,
        user_id: str,
        amount: int,
        *,
        reason: str = "",
        premium: bool | None = None,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.GrantCreditsResponse:
        """Adds credits (service role). Retries resend the same `request_id` (a new one per call unless given), so a
        grant whose answer was lost is never granted twice."""
        request = grant_credits_request(user_id, amount, reason, premium, request_id)
        response: pb.GrantCreditsResponse = await self._call(self._stub.GrantCredits, request, timeout)
        return response

    async def watch(self, job_id: str) -> AsyncIterator[pb.WatchJobResponse]:
        """The job's current state, then every change, ending after a terminal state.

        A dropped stream is reopened; events already seen are not repeated.
        """
        last_seq = -1
        last_job: pb.Job | None = None
        delay = self._retry.initial_backoff
        while True:
            stream = self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=self._metadata())
            try:
                async for update in stream:
                    delay = self._retry.initial_backoff
                    if update.HasField("event"):
                        if update.event.seq <= last_seq:
                            continue
                        last_seq = update.event.seq
                    elif last_job is not None and update.job == last_job:
                        continue  # a resumed stream's snapshot of a job that did not change meanwhile
                    last_job = update.job
                    yield update
                    # The event's state, not the job's: the job is the newest snapshot, which can
                    # already be terminal while earlier events are still being delivered.
                    state = update.event.state if update.HasField("event") else update.job.state
                    if state in TERMINAL_STATES:
                        return
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self._retry.max_backoff)
            finally:
                stream.cancel()

    async def wait(self, job_id: str, *, timeout: float) -> pb.Job:
        """Follows the job until it ends; raises JobTimeoutError (with the last state seen) after `timeout`."""
        last: pb.Job | None = None

        async def follow() -> pb.Job:
            nonlocal last
            async for update in self.watch(job_id):
                last = update.job
            assert last is not None
            return last

        try:
            return await asyncio.wait_for(follow(), timeout)
        except TimeoutError:
            raise JobTimeoutError(last if last is not None else await self.get_job(job_id)) from None
