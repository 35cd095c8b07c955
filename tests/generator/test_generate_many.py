"""GenerateMany end to end: many attempts started and stopped over one bidirectional stream of a real generator
(generator_service.server.start on free ports), driven by a real grpc.aio client whose requests come from a
queue, so a test sends starts and stops while it reads what the generator answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.server import GeneratorApp, start
from imagegen_common.errors import ErrorKind, ServiceError
from imagegen_common.grpc_errors import from_status_proto
from tests.generator.fake_google import FakeGeminiImagen, hang
from tests.generator.helpers import (
    JOB_ID,
    USER_ID,
    eventually,
    gemini_settings,
    generate_request,
    job_uuid,
    running,
    settings_for,
)

SERVICE = "imagegen.generator.v1.GeneratorService"
GENERATE_MANY = f"/{SERVICE}/GenerateMany"
GEMINI_MODEL = "gemini-api/imagen-4.0-fast-generate-001"
TOKEN = "internal-token"
Key = tuple[str, int]


class ManyStream:
    """One GenerateMany call: what the test queues is sent in order, and every answer read is kept."""

    def __init__(self, stub: pb_grpc.GeneratorServiceAsyncStub, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._outgoing: asyncio.Queue[pb.GenerateManyRequest | None] = asyncio.Queue()
        self.call = stub.GenerateMany(self._requests(), metadata=tuple(metadata))
        self.received: list[pb.GenerateManyResponse] = []

    async def _requests(self) -> AsyncIterator[pb.GenerateManyRequest]:
        while (request := await self._outgoing.get()) is not None:
            yield request

    def start(self, traceparent: str = "", **fields: Any) -> None:
        start = pb.StartAttempt(request=generate_request(**fields), traceparent=traceparent)
        self._outgoing.put_nowait(pb.GenerateManyRequest(start=start))

    def stop(self, job_id: str, attempt: int = 1) -> None:
        self._outgoing.put_nowait(pb.GenerateManyRequest(stop=pb.StopAttempt(job_id=job_id, attempt=attempt)))

    def half_close(self) -> None:
        """The request iterator ends: the client will send nothing more."""
        self._outgoing.put_nowait(None)

    async def read(self, within: float = 20.0) -> pb.GenerateManyResponse | None:
        """The next answer, or None once the generator has ended the stream."""
        async with asyncio.timeout(within):
            message = await self.call.read()
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, pb.GenerateManyResponse)
        self.received.append(message)
        return message

    async def read_until(
        self, done: Callable[[list[pb.GenerateManyResponse]], bool], within: float = 20.0
    ) -> list[pb.GenerateManyResponse]:
        """Reads until `done(everything read so far)` holds; fails if the stream ends first."""
        async with asyncio.timeout(within):
            while not done(self.received):
                assert await self.read() is not None, f"the stream ended early; read: {outcomes(self.received)}"
        return self.received

    async def read_to_end(self, within: float = 20.0) -> list[pb.GenerateManyResponse]:
        async with asyncio.timeout(within):
            while await self.read() is not None:
                pass
        return self.received

    async def close(self) -> None:
        self.half_close()
        if not self.call.done():
            self.call.cancel()


def key_of(response: pb.GenerateManyResponse) -> Key:
    return response.job_id, response.attempt


def outcome(response: pb.GenerateManyResponse) -> str:
    """What the response says: started, image_stored, completed or error."""
    if response.HasField("error"):
        return "error"
    event = response.event.WhichOneof("event")
    assert event is not None
    return event


def outcomes(responses: Sequence[pb.GenerateManyResponse]) -> dict[Key, list[str]]:
    """What each attempt got, in the order it arrived."""
    seen: dict[Key, list[str]] = {}
    for response in responses:
        seen.setdefault(key_of(response), []).append(outcome(response))
    return seen


def ended(*keys: Key) -> Callable[[list[pb.GenerateManyResponse]], bool]:
    """True once each of these attempts has had its last message (completed, or an error)."""

    def check(responses: list[pb.GenerateManyResponse]) -> bool:
        done = {key_of(r) for r in responses if outcome(r) in ("completed", "error")}
        return set(keys) <= done

    return check


def got(key: Key, what: str) -> Callable[[list[pb.GenerateManyResponse]], bool]:
    return lambda responses: any(key_of(r) == key and outcome(r) == what for r in responses)


def error_of(response: pb.GenerateManyResponse) -> ServiceError:
    """An AttemptError read back the way a caller does: it parses as a google.rpc.Status."""
    assert response.HasField("error"), f"not an error: {response}"
    status = status_pb2.Status.FromString(response.error.SerializeToString())
    return from_status_proto(code_pb2.Code.Name(response.error.code), status)


def error_domain(response: pb.GenerateManyResponse) -> str:
    status = status_pb2.Status.FromString(response.error.SerializeToString())
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.domain)
    raise AssertionError(f"no ErrorInfo in {response.error}")


def the_error(responses: Sequence[pb.GenerateManyResponse], key: Key) -> pb.GenerateManyResponse:
    (error,) = [r for r in responses if key_of(r) == key and r.HasField("error")]
    return error


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def many(
    stub: pb_grpc.GeneratorServiceAsyncStub, metadata: Sequence[tuple[str, str]] = ()
) -> AsyncIterator[ManyStream]:
    stream = ManyStream(stub, metadata)
    try:
        yield stream
    finally:
        await stream.close()


def attempt_count(app: GeneratorApp, code: str) -> float:
    """grpc_server_handling_seconds_count of GenerateMany's attempts that ended with `code`."""
    assert app.registry is not None
    labels = {"grpc_service": SERVICE, "grpc_method": "GenerateMany", "grpc_type": "attempt", "grpc_code": code}
    return app.registry.get_sample_value("grpc_server_handling_seconds_count", labels) or 0.0


def attempts_in_flight(app: GeneratorApp) -> float:
    assert app.registry is not None
    labels = {"grpc_service": SERVICE, "grpc_method": "GenerateMany"}
    return app.registry.get_sample_value("grpc_server_in_flight", labels) or 0.0


async def test_attempts_on_one_stream_each_get_their_own_events_and_half_closing_ends_it_ok(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, local_latency_min_seconds=0.3, local_latency_max_seconds=0.6)
    jobs = [job_uuid("job-a"), job_uuid("job-b"), job_uuid("job-c")]
    async with running(settings) as (_app, stub), many(stub) as stream:
        for job in jobs:
            stream.start(job_id=job, sample_count=2)
        await stream.read_until(ended(*((job, 1) for job in jobs)))
        stream.half_close()
        responses = await stream.read_to_end()
        assert await stream.call.code() == grpc.StatusCode.OK

    assert outcomes(responses) == {(job, 1): ["started", "image_stored", "image_stored", "completed"] for job in jobs}
    # They ran side by side: every attempt had started before the first one completed.
    kinds = [outcome(r) for r in responses]
    assert kinds[:3] == ["started"] * 3
    for job in jobs:
        mine = [r.event for r in responses if r.job_id == job]
        assert mine[0].started == pb.GenerationStarted(provider="local", model="local")
        paths = sorted(e.image_stored.storage_path for e in mine if e.HasField("image_stored"))
        assert paths == [f"{USER_ID}/{job}/1-0.png", f"{USER_ID}/{job}/1-1.png"]
        assert mine[-1].completed == pb.GenerationCompleted(delivered_count=2, filtered_count=0)
        assert sorted(p.name for p in (tmp_path / "storage" / "images" / USER_ID / job).iterdir()) == [
            "1-0.png",
            "1-1.png",
        ]


async def test_one_attempts_error_leaves_the_other_attempts_on_the_stream_alone(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, local_latency_min_seconds=0.3, local_latency_max_seconds=0.3)
    async with running(settings) as (_app, stub), many(stub) as stream:
        stream.start(job_id=job_uuid("job-good"), sample_count=1)
        stream.start(job_id=job_uuid("job-bad"), model="no-such-model")
        await stream.read_until(ended((job_uuid("job-bad"), 1)))
        # The stream is still open after an attempt's error: another attempt can start on it.
        stream.start(job_id=job_uuid("job-later"), sample_count=1)
        await stream.read_until(ended((job_uuid("job-good"), 1), (job_uuid("job-later"), 1)))
        stream.half_close()
        responses = await stream.read_to_end()
        assert await stream.call.code() == grpc.StatusCode.OK

    assert outcomes(responses) == {
        (job_uuid("job-good"), 1): ["started", "image_stored", "completed"],
        (job_uuid("job-bad"), 1): ["error"],
        (job_uuid("job-later"), 1): ["started", "image_stored", "completed"],
    }
    bad = the_error(responses, (job_uuid("job-bad"), 1))
    assert code_pb2.Code.Name(bad.error.code) == "INVALID_ARGUMENT"
    error = error_of(bad)
    assert (error.kind, error.reason, error.metadata) == (
        ErrorKind.INVALID_ARGUMENT,
        "UNKNOWN_MODEL",
        {"retryable": "false"},
    )
    assert error_domain(bad) == "imagegen.generator.v1"
    assert [v.field for v in error.violations] == ["model"]
    assert "no-such-model" in error.message
    assert not (tmp_path / "storage" / "images" / USER_ID / job_uuid("job-bad")).exists()


async def test_stopping_an_attempt_cancels_its_provider_request_and_nothing_more_comes_for_it(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.append(hang(30))
    settings = gemini_settings(
        tmp_path, gemini_imagen_api, local_latency_min_seconds=0.3, local_latency_max_seconds=0.3
    )
    async with running(settings) as (_app, stub), many(stub) as stream:
        stream.start(job_id=job_uuid("job-stopped"), model=GEMINI_MODEL)
        await stream.read_until(got((job_uuid("job-stopped"), 1), "started"))
        assert await eventually(lambda: len(gemini_imagen_api.requests) == 1)
        stream.start(job_id=job_uuid("job-other"), sample_count=1)

        stream.stop(job_uuid("job-stopped"), 1)

        # The provider sees the generator hang up, while the other attempt goes on to complete.
        assert await eventually(lambda: gemini_imagen_api.http.disconnects == 1, within=10)
        await stream.read_until(ended((job_uuid("job-other"), 1)))
        # Stopping an attempt that does not run here, or one already stopped or ended, changes nothing:
        # no answer for it, and the stream still serves.
        stream.stop(job_uuid("job-unknown"), 7)
        stream.stop(job_uuid("job-stopped"), 1)
        stream.stop(job_uuid("job-other"), 1)
        stream.start(job_id=job_uuid("job-after"), sample_count=1)
        await stream.read_until(ended((job_uuid("job-after"), 1)))
        stream.half_close()
        responses = await stream.read_to_end()
        assert await stream.call.code() == grpc.StatusCode.OK

    assert outcomes(responses) == {
        (job_uuid("job-stopped"), 1): ["started"],
        (job_uuid("job-other"), 1): ["started", "image_stored", "completed"],
        (job_uuid("job-after"), 1): ["started", "image_stored", "completed"],
    }
    assert len(gemini_imagen_api.requests) == 1  # not retried after the stop
    assert not (tmp_path / "storage" / "images" / USER_ID / job_uuid("job-stopped")).exists()


async def test_starting_an_attempt_that_runs_already_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, local_latency_min_seconds=1.0, local_latency_max_seconds=1.0)
    async with running(settings) as (_app, stub), many(stub) as stream:
        stream.start(job_id=JOB_ID, attempt=1, sample_count=2)
        await stream.read_until(got((JOB_ID, 1), "started"))
        stream.start(job_id=JOB_ID, attempt=1, sample_count=2)
        await stream.read_until(ended((JOB_ID, 1)))
        first = list(stream.received)
        await stream.read_until(got((JOB_ID, 1), "completed"))
        # Once it has ended it no longer runs: starting it again runs it again.
        stream.start(job_id=JOB_ID, attempt=1, sample_count=1)
        await stream.read_until(lambda rs: [outcome(r) for r in rs].count("completed") == 2)
        stream.half_close()
        responses = await stream.read_to_end()
        assert await stream.call.code() == grpc.StatusCode.OK

    assert [outcome(r) for r in first] == ["started", "error"]
    error = error_of(the_error(responses, (JOB_ID, 1)))
    assert (error.kind, error.reason, error.metadata["retryable"]) == (
        ErrorKind.ALREADY_EXISTS,
        "ATTEMPT_RUNNING",
        "false",
    )
    assert outcomes(responses) == {
        (JOB_ID, 1): [
            *["started", "error", "image_stored", "image_stored", "completed"],
            *["started", "image_stored", "completed"],
        ]
    }
    runs = [r.event.completed for r in responses if outcome(r) == "completed"]
    assert [c.delivered_count for c in runs] == [2, 1]


async def test_an_attempt_stopped_and_started_again_at_once_runs_again(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, local_latency_min_seconds=1.0, local_latency_max_seconds=1.0)
    async with running(settings) as (_app, stub), many(stub) as stream:
        stream.start(job_id=JOB_ID, attempt=1, sample_count=2)
        await stream.read_until(got((JOB_ID, 1), "started"))
        # Sent together: the stop must take effect before the start is looked at.
        stream.stop(JOB_ID, 1)
        stream.start(job_id=JOB_ID, attempt=1, sample_count=1)
        await stream.read_until(got((JOB_ID, 1), "completed"))
        # Stopped before its task ever ran: the stream still ends when asked.
        stream.start(job_id=job_uuid("job-2"), attempt=1, sample_count=1)
        stream.stop(job_uuid("job-2"), 1)
        stream.half_close()
        responses = await stream.read_to_end()
        assert await stream.call.code() == grpc.StatusCode.OK

    job_1 = outcomes(responses)[(JOB_ID, 1)]
    assert job_1 == ["started", "started", "image_stored", "completed"], job_1
    assert [r.event.completed.delivered_count for r in responses if outcome(r) == "completed"] == [1]


async def test_cancelling_the_call_stops_every_attempt_on_it(
    tmp_path: Path, gemini_imagen_api: FakeGeminiImagen
) -> None:
    gemini_imagen_api.faults.extend([hang(30), hang(30)])
    # The local attempt would wait 30 s before rendering: only a cancel ends it sooner.
    settings = gemini_settings(tmp_path, gemini_imagen_api, local_latency_min_seconds=30, local_latency_max_seconds=30)
    async with running(settings) as (app, stub), many(stub) as stream:
        stream.start(job_id=job_uuid("job-g1"), model=GEMINI_MODEL)
        stream.start(job_id=job_uuid("job-g2"), model=GEMINI_MODEL)
        stream.start(job_id=job_uuid("job-local"))
        await stream.read_until(lambda rs: [outcome(r) for r in rs].count("started") == 3)
        assert await eventually(lambda: len(gemini_imagen_api.requests) == 2)
        assert attempts_in_flight(app) == 3

        stream.call.cancel()

        assert await eventually(lambda: gemini_imagen_api.http.disconnects == 2, within=10)
        assert await eventually(lambda: attempts_in_flight(app) == 0, within=10)
        assert attempt_count(app, "CANCELLED") == 3
        assert await stream.call.code() == grpc.StatusCode.CANCELLED
        await asyncio.sleep(0.2)
        assert len(gemini_imagen_api.requests) == 2  # nothing retried after the cancel
    assert not (tmp_path / "storage" / "images" / USER_ID).exists()


async def test_a_draining_generator_refuses_new_attempts_finishes_its_own_then_ends_the_stream_ok(
    tmp_path: Path,
) -> None:
    settings = settings_for(
        tmp_path, local_latency_min_seconds=1.0, local_latency_max_seconds=2.0, shutdown_grace_seconds=20.0
    )
    app = await start(settings)
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.GeneratorServiceStub(channel)
            async with many(stub) as idle, many(stub) as stream:
                # A stream whose attempts are all done when the drain begins.
                idle.start(job_id=job_uuid("job-early"), sample_count=1)
                await idle.read_until(ended((job_uuid("job-early"), 1)))
                stream.start(job_id=job_uuid("job-a"), sample_count=2)
                stream.start(job_id=job_uuid("job-b"), sample_count=1)
                await stream.read_until(lambda rs: [outcome(r) for r in rs].count("started") == 2)

                stopping = asyncio.create_task(app.stop())
                await asyncio.sleep(0)  # app.stop() starts the drain before its first await
                stream.start(job_id=job_uuid("job-late"), sample_count=1)

                # Neither client half-closes: the generator ends each stream once its attempts are done, the
                # idle one at once, well within the grace period (they end by themselves, not cut off by it).
                await idle.read_to_end(within=10)
                assert await idle.call.code() == grpc.StatusCode.OK
                responses = await stream.read_to_end(within=15)
                assert await stream.call.code() == grpc.StatusCode.OK
                await asyncio.wait_for(asyncio.shield(stopping), 15)
    finally:
        if stopping is None:
            await app.stop()
        else:
            await stopping

    assert outcomes(idle.received) == {(job_uuid("job-early"), 1): ["started", "image_stored", "completed"]}
    assert outcomes(responses) == {
        (job_uuid("job-a"), 1): ["started", "image_stored", "image_stored", "completed"],
        (job_uuid("job-b"), 1): ["started", "image_stored", "completed"],
        (job_uuid("job-late"), 1): ["error"],
    }
    late = the_error(responses, (job_uuid("job-late"), 1))
    assert code_pb2.Code.Name(late.error.code) == "UNAVAILABLE"
    error = error_of(late)
    assert (error.kind, error.reason, error.metadata) == (ErrorKind.UNAVAILABLE, "DRAINING", {"retryable": "true"})
    assert error_domain(late) == "imagegen.generator.v1"


async def test_generate_many_needs_the_shared_token(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, auth_token=TOKEN)) as (_app, stub):
        async with many(stub) as refused:
            refused.start(job_id=JOB_ID, sample_count=1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.read()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with many(stub, bearer("wrong-token")) as wrong:
            wrong.start(job_id=JOB_ID, sample_count=1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await wrong.read()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not (tmp_path / "storage" / "images" / USER_ID).exists()

        async with many(stub, bearer(TOKEN)) as allowed:
            allowed.start(job_id=JOB_ID, sample_count=1)
            await allowed.read_until(ended((JOB_ID, 1)))
            allowed.half_close()
            responses = await allowed.read_to_end()
            assert await allowed.call.code() == grpc.StatusCode.OK
    assert outcomes(responses) == {(JOB_ID, 1): ["started", "image_stored", "completed"]}


async def test_each_attempt_is_measured_and_logged_as_its_own_call_continuing_its_trace(tmp_path: Path) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running(settings_for(tmp_path)) as (app, stub), many(stub) as stream:
            stream.start(job_id=job_uuid("job-traced"), sample_count=1, traceparent=f"00-{trace_id}-{parent}-01")
            stream.start(job_id=job_uuid("job-untraced"), sample_count=1)
            stream.start(job_id=job_uuid("job-bad"), model="no-such-model")
            await stream.read_until(
                ended((job_uuid("job-traced"), 1), (job_uuid("job-untraced"), 1), (job_uuid("job-bad"), 1))
            )
            stream.half_close()
            await stream.read_to_end()

            assert attempt_count(app, "OK") == 2
            assert attempt_count(app, "INVALID_ARGUMENT") == 1
            assert attempts_in_flight(app) == 0

    lines = {line["job_id"]: line for line in logs if line["event"] == "rpc" and line.get("method") == GENERATE_MANY}
    assert set(lines) == {job_uuid("job-traced"), job_uuid("job-untraced"), job_uuid("job-bad")}
    traced = lines[job_uuid("job-traced")]
    assert (traced["code"], traced["trace_id"], traced["parent_span_id"]) == ("OK", trace_id, parent)
    assert traced["span_id"] != parent and traced["attempt"] == 1 and traced["user_id"] == USER_ID
    # Without a traceparent an attempt starts a trace of its own.
    untraced = lines[job_uuid("job-untraced")]
    assert untraced["code"] == "OK" and "parent_span_id" not in untraced
    assert untraced["trace_id"] not in (trace_id, lines[job_uuid("job-bad")]["trace_id"])
    assert lines[job_uuid("job-bad")]["code"] == "INVALID_ARGUMENT"
