"""A blocking client for JobService, with the same surface as the async ImageGenClient.

For scripts, Django/Flask views, Celery tasks and notebooks: no event loop needed. Every call carries a deadline;
only UNAVAILABLE is retried (with backoff), and watch() resumes where it left off when its stream drops.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_client.client import (
    TERMINAL_STATES,
    JobTimeoutError,
    RetryPolicy,
    TlsOptions,
    TokenSource,
    create_job_request,
    grant_credits_request,
)

T = TypeVar("T")


class ImageGenSyncClient:
    """Blocking client. `token` is a bearer JWT, or a function returning a fresh one for each call.

    TLS: pass `root_certificates` (or `secure=True` for the system's CAs); add `certificate_chain` and
    `private_key` for mutual TLS. Use it as a context manager, or call close().
    """

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
            self._channel = grpc.secure_channel(target, tls.credentials(), options=tls.options())
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.JobServiceStub(self._channel)
        self._token: TokenSource = token if callable(token) else (lambda: token)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()

    def __enter__(self) -> ImageGenSyncClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token()}"),)

    def _backoff(self, delay: float) -> float:
        time.sleep(delay * random.uniform(0.5, 1.5))
        return min(delay * 2, self._retry.max_backoff)

    def _call(self, rpc: Callable[..., T], request: object, timeout: float | None) -> T:
        delay = self._retry.initial_backoff
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return rpc(request, timeout=timeout or self._timeout, metadata=self._metadata())
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self._retry.attempts:
                    raise
                delay = self._backoff(delay)
        raise AssertionError("unreachable")

    def create_job(
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
        response: pb.CreateJobResponse = self._call(self._stub.CreateJob, request, timeout)
        return response.job

    def list_webhook_deliveries(self, job_id: str, *, timeout: float | None = None) -> list[pb.WebhookDelivery]:
        """The job's webhook deliveries, in event order, each with its sends and their HTTP status."""
        response: pb.ListWebhookDeliveriesResponse = self._call(
            self._stub.ListWebhookDeliveries, pb.ListWebhookDeliveriesRequest(job_id=job_id), timeout
        )
        return list(response.deliveries)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        response: pb.GetJobResponse = self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout)
        return response.job

    def list_jobs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: int = 0,
        user_id: str = "",
        timeout: float | None = None,
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(page_size=page_size, page_token=page_token, state=state, user_id=user_id)  # type: ignore[arg-type]
        response: pb.ListJobsResponse = self._call(self._stub.ListJobs, request, timeout)
        return response

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        response: pb.CancelJobResponse = self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout)
        return response.job

    def delete_job(self, job_id: str, *, timeout: float | None = None) -> None:
        """Deletes a job and its images; see ImageGenClient.delete_job."""
        self._call(self._stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id), timeout)

    def list_models(self, *, timeout: float | None = None) -> list[pb.Model]:
        """The models a job can use, with their capabilities and price per image in credits."""
        response: pb.ListModelsResponse = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    def list_templates(self, *, timeout: float | None = None) -> list[pb.Template]:
        response: pb.ListTemplatesResponse = self._call(self._stub.ListTemplates, pb.ListTemplatesRequest(), timeout)
        return list(response.templates)

    def credit_balance(self, user_id: str = "", *, timeout: float | None = None) -> pb.GetCreditBalanceResponse:
        response: pb.GetCreditBalanceResponse = self._call(
            self._stub.GetCreditBalance, pb.GetCreditBalanceRequest(user_id=user_id), timeout
        )
        return response

    def grant_credits(
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
        response: pb.GrantCreditsResponse = self._call(self._stub.GrantCredits, request, timeout)
        return response

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[pb.WatchJobResponse]:
        """The job's current state, then every change, ending after a terminal state.

        A dropped stream is reopened; events already seen are not repeated. `timeout` bounds the whole watch
        (DEADLINE_EXCEEDED when it runs out); None watches for as long as the job runs.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seq = -1
        last_job: pb.Job | None = None
        delay = self._retry.initial_backoff
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            stream: Any = self._stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id), timeout=remaining, metadata=self._metadata()
            )
            try:
                for update in stream:
                    delay = self._retry.initial_backoff
                    if update.HasField("event"):
                        if update.event.seq <= last_seq:
                            continue
                        last_seq = update.event.seq
                    elif last_job is not None and update.job == last_job:
                        continue  # a resumed stream's snapshot of a job that did not change meanwhile
                    last_job = update.job
                    yield update
                    # The event's state, not the job's: the job is the newest snapshot, which can already be
                    # terminal while earlier events are still being delivered.
                    state = update.event.state if update.HasField("event") else update.job.state
                    if state in TERMINAL_STATES:
                        return
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                delay = self._backoff(delay)
            finally:
                stream.cancel()

    def wait(self, job_id: str, *, timeout: float) -> pb.Job:
        """Follows the job until it ends; raises JobTimeoutError (with the last state seen) after `timeout`."""
        last: pb.Job | None = None
        try:
            for update in self.watch(job_id, timeout=timeout):
                last = update.job
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            raise JobTimeoutError(last if last is not None else self.get_job(job_id)) from None
        assert last is not None
        if last.state not in TERMINAL_STATES:
            raise JobTimeoutError(last)
        return last
