"""JobService's generator client over a real GeneratorService: many attempts to a GenerateMany stream, each
with its own deadline, stop and errors, and what happens to them when a stream or a generator goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as gen_pb
from imagegen.generator.v1 import generator_service_pb2_grpc as gen_grpc

from generator_service import server as generator_server
from generator_service.server import GeneratorApp
from job_service.domain import GenerationCompleted, GenerationFailure, GenerationStarted, ImageStored, Job, Params
from job_service.generator_client import GeneratorClient
from tests.generator.helpers import eventually
from tests.support.jobs import a_job
from tests.support.services import generator_settings

SERVICE = "imagegen.generator.v1.GeneratorService"


def job(**params: Any) -> Job:
    return a_job(params=Params(**{"sample_count": 1, **params}), credits_reserved=1)


def streams_open(app: GeneratorApp) -> float:
    assert app.registry is not None
    return app.registry.get_sample_value("imagegen_generate_streams") or 0.0


def attempts_running(app: GeneratorApp) -> float:
    assert app.registry is not None
    labels = {"grpc_service": SERVICE, "grpc_method": "GenerateMany"}
    return app.registry.get_sample_value("grpc_server_in_flight", labels) or 0.0


async def start_generator(tmp_path: Path, latency: float = 0.0, **overrides: Any) -> GeneratorApp:
    """A generator whose local model takes `latency` seconds per attempt."""
    return await generator_server.start(
        generator_settings(
            tmp_path / "storage", local_latency_min_seconds=latency, local_latency_max_seconds=latency, **overrides
        )
    )


@contextlib.asynccontextmanager
async def generator(tmp_path: Path, latency: float = 0.0, **overrides: Any) -> AsyncIterator[GeneratorApp]:
    app = await start_generator(tmp_path, latency, **overrides)
    try:
        yield app
    finally:
        await app.stop()


async def run(client: GeneratorClient, attempt: Job) -> list[Any]:
    return [event async for event in client.generate(attempt)]


async def test_many_attempts_at_once_travel_on_a_few_streams_each_with_its_own_events(tmp_path: Path) -> None:
    async with generator(tmp_path, latency=0.5) as app:
        client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=2)
        try:
            jobs = [job(sample_count=2) for _ in range(150)]
            results = await asyncio.gather(*(run(client, j) for j in jobs))
            # 150 attempts at once at most 64 to a stream: three streams, not 150.
            assert streams_open(app) == 3
        finally:
            await client.close()
        assert await eventually(lambda: streams_open(app) == 0), "closing the client ends its streams"
    for j, events in zip(jobs, results, strict=True):
        assert isinstance(events[0], GenerationStarted) and isinstance(events[-1], GenerationCompleted)
        stored = [e.image for e in events if isinstance(e, ImageStored)]
        assert sorted(i.index for i in stored) == [0, 1]
        assert all(f"/{j.id}/" in i.storage_path for i in stored), "each attempt gets its own images"


async def test_one_attempts_error_arrives_with_its_details_and_leaves_the_others_alone(tmp_path: Path) -> None:
    async with generator(tmp_path, latency=0.3) as app:
        client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=1)
        try:
            good, bad = job(), a_job(model="no-such-model", params=Params(sample_count=1))
            outcomes = await asyncio.gather(run(client, good), run(client, bad), return_exceptions=True)
        finally:
            await client.close()
    assert isinstance(outcomes[0], list) and isinstance(outcomes[0][-1], GenerationCompleted)
    failure = outcomes[1]
    assert isinstance(failure, GenerationFailure)
    assert (failure.reason, failure.retryable, failure.counts) == ("UNKNOWN_MODEL", False, True)
    assert "no-such-model" in failure.message


async def test_an_attempt_past_its_deadline_fails_retryable_and_is_stopped_at_the_generator(tmp_path: Path) -> None:
    async with generator(tmp_path, latency=30.0) as app:
        client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, call_timeout_seconds=0.5)
        try:
            with pytest.raises(GenerationFailure) as caught:
                await run(client, job())
            assert (caught.value.reason, caught.value.retryable, caught.value.counts) == (
                "DEADLINE_EXCEEDED",
                True,
                True,
            )
            assert await eventually(lambda: attempts_running(app) == 0), "the generator stopped the attempt"
            assert streams_open(app) == 1, "the stream stays open for the next attempts"
        finally:
            await client.close()


async def test_leaving_an_attempt_early_stops_it_at_the_generator_and_not_its_neighbours(tmp_path: Path) -> None:
    async with generator(tmp_path, latency=1.0) as app:
        client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=1)
        try:
            neighbour = asyncio.create_task(run(client, job()))
            left = client.generate(job())
            assert isinstance(await anext(left), GenerationStarted)
            assert await eventually(lambda: attempts_running(app) == 2)
            await left.aclose()
            assert await eventually(lambda: attempts_running(app) == 1), "the attempt left was stopped"
            events = await neighbour
            assert isinstance(events[-1], GenerationCompleted)
        finally:
            await client.close()


async def test_a_generator_that_goes_away_fails_each_attempt_on_its_streams_uncounted(tmp_path: Path) -> None:
    app = await start_generator(tmp_path, latency=30.0, shutdown_grace_seconds=0.0)
    client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=2)
    try:
        attempts = [asyncio.create_task(run(client, job())) for _ in range(6)]
        assert await eventually(lambda: attempts_running(app) == 6)
        await app.stop()  # no grace: whatever runs is cut off
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    finally:
        await client.close()
    assert all(isinstance(o, GenerationFailure) for o in outcomes), outcomes
    failures = [o for o in outcomes if isinstance(o, GenerationFailure)]
    # Like a replica that died: worth another attempt, and not the job's fault.
    assert {(f.reason, f.retryable, f.counts) for f in failures} == {("GENERATOR_UNAVAILABLE", True, False)}


async def test_a_draining_generator_finishes_the_attempts_on_its_streams_and_refuses_new_ones(
    tmp_path: Path,
) -> None:
    app = await start_generator(tmp_path, latency=2.0, shutdown_grace_seconds=20.0)
    client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=1)
    try:
        running = [asyncio.create_task(run(client, job())) for _ in range(3)]
        assert await eventually(lambda: attempts_running(app) == 3)
        stopping = asyncio.create_task(app.stop())
        await asyncio.sleep(0.1)  # the drain has begun
        with pytest.raises(GenerationFailure) as refused:
            await run(client, job())
        assert (refused.value.reason, refused.value.retryable, refused.value.counts) == (
            "GENERATOR_UNAVAILABLE",
            True,
            False,
        )
        finished = await asyncio.gather(*running)
        assert all(isinstance(events[-1], GenerationCompleted) for events in finished)
        await asyncio.wait_for(stopping, 20)
        assert streams_open(app) == 0
    finally:
        await client.close()


async def test_a_stream_past_its_age_takes_no_new_attempts_and_closes_when_its_own_have_ended(
    tmp_path: Path,
) -> None:
    # Attempts of 3 s, so the first is still running when the second starts, however slow the machine.
    async with generator(tmp_path, latency=3.0) as app:
        client = GeneratorClient(f"127.0.0.1:{app.port}", token=None, min_streams=1, stream_max_age_seconds=0.3)
        try:
            first = asyncio.create_task(run(client, job()))
            assert await eventually(lambda: streams_open(app) == 1 and attempts_running(app) == 1)
            await asyncio.sleep(0.4)
            second = asyncio.create_task(run(client, job()))
            assert await eventually(lambda: attempts_running(app) == 2)
            assert streams_open(app) == 2, "the old stream was too old for the second attempt"
            assert isinstance((await first)[-1], GenerationCompleted), "an attempt on a retired stream still finishes"
            assert await eventually(lambda: streams_open(app) == 1), "the retired stream closed once it was empty"
            assert isinstance((await second)[-1], GenerationCompleted)
        finally:
            await client.close()


async def test_a_generator_without_generate_many_keeps_attempts_waiting_instead_of_failing_jobs() -> None:
    # A rolling upgrade that reaches JobService first: the old generator answers UNIMPLEMENTED. The jobs must
    # wait for a generator that serves GenerateMany (retried, not counted), not fail for good.
    server = grpc.aio.server()
    gen_grpc.add_GeneratorServiceServicer_to_server(gen_grpc.GeneratorServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GeneratorClient(f"127.0.0.1:{port}", token=None)
    try:
        with pytest.raises(GenerationFailure) as caught:
            await run(client, job())
    finally:
        await client.close()
        await server.stop(0)
    assert (caught.value.reason, caught.value.retryable, caught.value.counts) == ("GENERATOR_UNAVAILABLE", True, False)


class _NewerGenerator(gen_grpc.GeneratorServiceServicer):
    """Answers each attempt with an event of a kind this JobService does not know, then its completion."""

    async def GenerateMany(self, requests: Any, context: Any) -> Any:
        async for request in requests:
            job_id, attempt = request.start.request.job_id, request.start.request.attempt
            # A kind added to the oneof later reaches an older reader as an unset oneof.
            yield gen_pb.GenerateManyResponse(job_id=job_id, attempt=attempt, event=gen_pb.GenerateResponse())
            done = gen_pb.GenerateResponse(completed=gen_pb.GenerationCompleted(delivered_count=1))
            yield gen_pb.GenerateManyResponse(job_id=job_id, attempt=attempt, event=done)


async def test_an_event_of_a_kind_added_later_is_skipped_not_fatal() -> None:
    server = grpc.aio.server()
    gen_grpc.add_GeneratorServiceServicer_to_server(_NewerGenerator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GeneratorClient(f"127.0.0.1:{port}", token=None)
    try:
        events = await run(client, job())
    finally:
        await client.close()
        await server.stop(0)
    assert events == [GenerationCompleted(1, 0, [])]
