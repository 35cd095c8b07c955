"""The shared-token check on the JobService -> generator hop, against the real server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.server import start
from tests.generator.helpers import JOB_ID, USER_ID, settings_for

TOKEN = "internal-token"


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    app = await start(settings_for(tmp_path, auth_token=TOKEN))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield channel
    finally:
        await app.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_calls_with_the_token_are_served(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.GeneratorServiceStub(channel)
    reply = await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(TOKEN))
    assert [m.id for m in reply.models] == ["local"]
    request = pb.GenerateRequest(job_id=JOB_ID, attempt=1, user_id=USER_ID, prompt="p", model="local", sample_count=1)
    events = [e async for e in stub.Generate(request, metadata=bearer(TOKEN))]
    assert events[-1].completed.delivered_count == 1


@pytest.mark.parametrize("metadata", [(), bearer("wrong-token")], ids=["no-token", "wrong-token"])
async def test_unary_and_streaming_calls_without_the_right_token_are_unauthenticated(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = pb_grpc.GeneratorServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
    request = pb.GenerateRequest(job_id=JOB_ID, attempt=1, user_id=USER_ID, prompt="p", model="local", sample_count=1)
    with pytest.raises(grpc.aio.AioRpcError) as streaming:
        _ = [e async for e in stub.Generate(request, metadata=metadata)]
    assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_unknown_method_without_the_token_is_unauthenticated_too(channel: grpc.aio.Channel) -> None:
    # gRPC hands the interceptor no handler (None) for a method the server does not have.
    call = channel.unary_unary(
        "/imagegen.generator.v1.GeneratorService/NoSuchMethod",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as with_token:
        await call(b"", metadata=bearer(TOKEN))
    assert with_token.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_checks_stay_open(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
