"""The shared-token check on the JobService -> generator hop, against the real server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.generator.v1 import generator_service_pb2 as pb
from imagegen.generator.v1 import generator_service_pb2_grpc as pb_grpc

from generator_service.server import start
from tests.generator.helpers import JOB_ID, USER_ID, settings_for
from tests.support.logs import captured_logs
from tests.support.rpc_errors import RpcFailure, failure_of

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


SERVICE = "/imagegen.generator.v1.GeneratorService"
TRUNCATED = b"\x0a\x05ab"  # field 1, length-delimited, 5 bytes announced and 2 sent
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # GenerateRequest.job_id as bytes that are not UTF-8
DECODER_WORDS = ("parsing", "wire format", "utf-8", "decode", "corrupt", "imagegen.generator.v1.")


async def raw_failure(channel: grpc.aio.Channel, method: str, body: bytes, metadata: Any) -> RpcFailure:
    """Sends `body` as it is (no serializer) to a unary, server-streaming or bidirectional method."""

    async def drain(stream: Any) -> list[Any]:
        return [message async for message in stream]

    if method == "ListModels":
        return await failure_of(channel.unary_unary(f"{SERVICE}/{method}")(body, metadata=metadata, timeout=10))
    if method == "Generate":
        return await failure_of(drain(channel.unary_stream(f"{SERVICE}/{method}")(body, metadata=metadata, timeout=10)))
    stream = channel.stream_stream(f"{SERVICE}/{method}")(iter([body]), metadata=metadata, timeout=10)
    return await failure_of(drain(stream))


BODIES = [("ListModels", TRUNCATED), ("Generate", TRUNCATED), ("Generate", BAD_UTF8), ("GenerateMany", TRUNCATED)]


@pytest.mark.parametrize(("method", "body"), BODIES, ids=["ListModels", "Generate", "Generate-utf8", "GenerateMany"])
async def test_a_body_that_does_not_parse_is_unauthenticated_without_the_token_and_invalid_with_it(
    channel: grpc.aio.Channel, method: str, body: bytes
) -> None:
    with captured_logs() as logs:
        without = await raw_failure(channel, method, body, ())
        wrong = await raw_failure(channel, method, body, bearer("wrong-token"))
        with_token = await raw_failure(channel, method, body, bearer(TOKEN))
    assert (without.code, wrong.code) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    assert (with_token.code, with_token.reason) == ("INVALID_ARGUMENT", "UNDECODABLE_REQUEST")
    assert with_token.domains == ["imagegen.generator.v1"]
    assert not [word for word in DECODER_WORDS if word in with_token.message.lower()], with_token.message
    assert not logs.tracebacks()


async def test_a_health_check_that_does_not_parse_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    with captured_logs() as logs:
        call = channel.unary_unary("/grpc.health.v1.Health/Check")
        failure = await failure_of(call(TRUNCATED, timeout=10))
    assert failure.code == "INVALID_ARGUMENT"
    assert not [word for word in DECODER_WORDS if word in failure.message.lower()], failure.message
    assert not logs.tracebacks()


async def test_made_up_method_names_refused_without_the_token_add_no_metric_series(tmp_path: Path) -> None:
    app = await start(settings_for(tmp_path, auth_token=TOKEN))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            for n in range(20):
                call = channel.unary_unary(f"/made.up.Service{n}/Method{n}")
                assert (await failure_of(call(b"", timeout=10))).code == "UNAUTHENTICATED"
        assert app.registry is not None
        methods = {
            (sample.labels["grpc_service"], sample.labels["grpc_method"])
            for metric in app.registry.collect()
            if metric.name.startswith("grpc_server")
            for sample in metric.samples
            if "grpc_method" in sample.labels
        }
    finally:
        await app.stop()
    assert methods == {("unknown", "unknown")}
