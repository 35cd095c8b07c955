"""JobService -> GeneratorService over one channel: round_robin over replicas, keepalives that long streams survive."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
from imagegen.generator.v1 import generator_service_pb2 as gen_pb
from imagegen.generator.v1 import generator_service_pb2_grpc as gen_grpc

from generator_service import server as generator_server
from job_service.domain import GenerationCompleted, GenerationFailure, ImageStored, Job, Params
from job_service.generator_client import GeneratorClient, channel_options
from tests.support.jobs import a_job
from tests.support.services import generator_settings


def one_image_job(attempt: int = 1) -> Job:
    return a_job(attempt=attempt, params=Params(sample_count=1), credits_reserved=1)


async def run_attempt(client: GeneratorClient) -> list[Any]:
    return [event async for event in client.generate(one_image_job())]


async def test_a_stream_longer_than_several_keepalive_intervals_is_not_cut(tmp_path: Path) -> None:
    # gRPC's default server policy answers a client pinging more often than every 5 minutes with
    # GOAWAY "too_many_pings", killing the streams on the connection. The client pings every 10 s; a
    # 1 s interval here shows the same thing within a short test.
    app = await generator_server.start(
        generator_settings(tmp_path / "storage", local_latency_min_seconds=4.0, local_latency_max_seconds=4.0)
    )
    options = dict(channel_options())
    options["grpc.keepalive_time_ms"] = 1_000
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=list(options.items())) as channel:
            stub = gen_grpc.GeneratorServiceStub(channel)
            request = gen_pb.GenerateRequest(
                job_id=str(uuid.uuid4()),
                attempt=1,
                user_id=str(uuid.uuid4()),
                prompt="p",
                model="local",
                sample_count=1,
            )
            kinds = [response.WhichOneof("event") async for response in stub.Generate(request, timeout=60)]
    finally:
        await app.stop()
    assert kinds == ["started", "image_stored", "completed"]


async def test_round_robin_spreads_attempts_over_replicas_and_skips_one_that_is_down(tmp_path: Path) -> None:
    first = await generator_server.start(generator_settings(tmp_path / "storage"))
    second = await generator_server.start(generator_settings(tmp_path / "storage"))
    client = GeneratorClient(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}", token=None)
    try:
        bases: list[str] = []
        for _ in range(8):
            events = await run_attempt(client)
            assert isinstance(events[-1], GenerationCompleted)
            bases += [e.image.url.split("/storage/")[0] for e in events if isinstance(e, ImageStored)]
        assert len(set(bases)) == 2, f"both replicas served attempts: {bases}"

        await first.stop()
        outcomes: list[str] = []
        for _ in range(8):
            try:
                events = await run_attempt(client)
                outcomes.append("done" if isinstance(events[-1], GenerationCompleted) else "?")
            except GenerationFailure as failure:
                # The one call that may meet the replica just as it goes away must be a retryable,
                # uncounted failure, never a permanent one.
                assert failure.retryable and not failure.counts, failure
                outcomes.append(failure.reason)
        assert outcomes[-6:] == ["done"] * 6, outcomes
    finally:
        await client.close()
        await second.stop()


async def test_an_unreachable_generator_is_a_retryable_failure_that_does_not_count(tmp_path: Path) -> None:
    app = await generator_server.start(generator_settings(tmp_path / "storage"))
    port = app.port
    await app.stop()  # now nothing listens there
    client = GeneratorClient(f"127.0.0.1:{port}", token=None)
    try:
        try:
            await run_attempt(client)
        except GenerationFailure as failure:
            assert (failure.reason, failure.retryable, failure.counts) == ("GENERATOR_UNAVAILABLE", True, False)
        else:
            raise AssertionError("a generator that is down cannot complete an attempt")
    finally:
        await client.close()
