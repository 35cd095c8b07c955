"""Both clients against a scripted JobService: retries on UNAVAILABLE only, deadlines, tokens, watch resumption."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_client import ImageGenClient, ImageGenSyncClient, JobTimeoutError, RetryPolicy, TlsOptions

FAST = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)


class ScriptedJobService(pb_grpc.JobServiceServicer):
    """GetJob: UNAVAILABLE `unavailable_first` times, then the job. CancelJob: always INVALID_ARGUMENT.
    WatchJob: the first stream drops (UNAVAILABLE) after two events; the next one replays from the start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.tokens: list[str] = []
        self.deadlines: list[float | None] = []
        self.unavailable_first = 2
        self.watch_streams = 0
        self.watch_never_ends = False

    def _seen(self, name: str, context: grpc.ServicerContext) -> int:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
            self.deadlines.append(context.time_remaining())
            return self.calls[name]

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        if self._seen("GetJob", context) <= self.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.GetJobResponse(job=pb.Job(id=request.job_id, state=pb.JOB_STATE_PENDING))

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        self._seen("CancelJob", context)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no")

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchJobResponse]:
        self._seen("WatchJob", context)
        if self.watch_never_ends:
            yield pb.WatchJobResponse(job=pb.Job(id=request.job_id, state=pb.JOB_STATE_GENERATING))
            time.sleep(2)
            return
        with self.lock:
            self.watch_streams += 1
            first = self.watch_streams == 1
        states = [pb.JOB_STATE_PENDING, pb.JOB_STATE_GENERATING, pb.JOB_STATE_COMPLETED]
        job = pb.Job(id=request.job_id, state=pb.JOB_STATE_PENDING)
        yield pb.WatchJobResponse(job=job)
        for seq, state in enumerate(states, start=1):
            job = pb.Job(id=request.job_id, state=state)
            yield pb.WatchJobResponse(job=job, event=pb.JobEvent(seq=seq, state=state))
            if first and seq == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")

    def ListTemplates(self, request: pb.ListTemplatesRequest, context: grpc.ServicerContext) -> Any:
        self._seen("ListTemplates", context)
        time.sleep(1.0)  # slower than the callers' deadline
        return pb.ListTemplatesResponse()


@pytest.fixture
def scripted() -> Iterator[tuple[str, ScriptedJobService]]:
    service = ScriptedJobService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_JobServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", service
    server.stop(None)


def test_sync_client_retries_unavailable_only_sends_a_fresh_token_and_a_deadline(
    scripted: tuple[str, ScriptedJobService],
) -> None:
    target, service = scripted
    issued = iter(f"token-{i}" for i in range(100))
    with ImageGenSyncClient(target, lambda: next(issued), retry=FAST, timeout=5) as client:
        assert client.get_job("j1").id == "j1"
        assert service.calls["GetJob"] == 3, "two UNAVAILABLE answers retried, then the answer"
        with pytest.raises(grpc.RpcError) as invalid:
            client.cancel_job("j1")
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert service.calls["CancelJob"] == 1, "INVALID_ARGUMENT is not retried"
        with pytest.raises(grpc.RpcError) as slow:
            client.list_templates(timeout=0.2)
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert service.calls["ListTemplates"] == 1, "DEADLINE_EXCEEDED is not retried"
    assert service.tokens[:4] == [f"Bearer token-{i}" for i in range(4)]
    assert all(d is not None and d < 6 for d in service.deadlines), "every call carries a deadline"

    service.unavailable_first = 10
    with ImageGenSyncClient(target, "t", retry=FAST) as client, pytest.raises(grpc.RpcError) as gave_up:
        client.get_job("j2")
    assert gave_up.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_sync_watch_resumes_after_a_dropped_stream_without_repeating_events(
    scripted: tuple[str, ScriptedJobService],
) -> None:
    target, service = scripted
    with ImageGenSyncClient(target, "t", retry=FAST) as client:
        updates = list(client.watch("j1"))
        assert client.wait("j1", timeout=5).state == pb.JOB_STATE_COMPLETED
    assert service.watch_streams == 3
    assert [u.event.seq for u in updates if u.HasField("event")] == [1, 2, 3]
    assert updates[-1].job.state == pb.JOB_STATE_COMPLETED


async def test_async_client_retries_unavailable_only(scripted: tuple[str, ScriptedJobService]) -> None:
    target, service = scripted
    async with ImageGenClient(target, "t", retry=FAST) as client:
        assert (await client.get_job("j1")).id == "j1"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await client.cancel_job("j1")
        updates = [u async for u in client.watch("j1")]
    assert service.calls["GetJob"] == 3 and service.calls["CancelJob"] == 1
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [u.event.seq for u in updates if u.HasField("event")] == [1, 2, 3]


def test_sync_wait_raises_job_timeout_with_the_last_state(scripted: tuple[str, ScriptedJobService]) -> None:
    target, service = scripted
    service.watch_never_ends = True
    with ImageGenSyncClient(target, "t", retry=FAST) as client, pytest.raises(JobTimeoutError) as timed_out:
        client.wait("j1", timeout=0.3)
    assert timed_out.value.job.state == pb.JOB_STATE_GENERATING


def test_tls_options_need_a_key_with_a_certificate_and_stay_off_unless_asked() -> None:
    assert TlsOptions.of(False, None, None, None, None) is None
    assert TlsOptions.of(True, None, None, None, None) == TlsOptions()
    assert TlsOptions.of(False, b"ca", None, None, "svc").options() == [("grpc.ssl_target_name_override", "svc")]
    with pytest.raises(ValueError, match="private key"):
        TlsOptions.of(False, b"ca", b"cert", None, None)
