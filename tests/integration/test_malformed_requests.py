"""Request bodies that do not parse, and request values too long to log, against a real JobService.

grpc-python decodes a body before any of our code runs; a body that does not parse must still be refused
UNAUTHENTICATED to a caller without a valid token, and INVALID_ARGUMENT (reason UNDECODABLE_REQUEST, no decoder
text) to one with a token, without a traceback in the log. A request value of 1 MiB must not put 1 MiB a line
into the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.logs import CapturedLogs, captured_logs
from tests.support.rpc_errors import RpcFailure, failure_of
from tests.support.services import Services, new_user, running_services

SERVICE = "/imagegen.job.v1.JobService"
UNARY = {
    "CreateJob": pb.CreateJobRequest,
    "GetJob": pb.GetJobRequest,
    "ListJobs": pb.ListJobsRequest,
    "CancelJob": pb.CancelJobRequest,
    "DeleteJob": pb.DeleteJobRequest,
    "ListTemplates": pb.ListTemplatesRequest,
    "GetCreditBalance": pb.GetCreditBalanceRequest,
    "GrantCredits": pb.GrantCreditsRequest,
}
STREAMING = {"WatchJob": pb.WatchJobRequest}
TRUNCATED = b"\x0a\x05ab"  # field 1, length-delimited, 5 bytes announced and 2 sent
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 as a string of bytes that are not UTF-8
# What protobuf's decoder says; none of it may reach the caller.
DECODER_WORDS = ("parsing", "wire format", "utf-8", "decode", "corrupt", "imagegen.job.v1.")


def bad_bodies(request_type: Any) -> dict[str, bytes]:
    first = request_type.DESCRIPTOR.fields_by_number.get(1)
    utf8_checked = first is not None and first.type == descriptor.FieldDescriptor.TYPE_STRING
    return {"truncated": TRUNCATED, **({"bad UTF-8": BAD_UTF8} if utf8_checked else {})}


@pytest.fixture(scope="module")
async def services(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Services]:
    async with running_services(database_url, tmp_path_factory.mktemp("malformed"), job={"max_in_flight": 0}) as s:
        yield s


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def raw_call(channel: grpc.aio.Channel, method: str, body: bytes, metadata: Any) -> RpcFailure:
    """Sends `body` as it is (no serializer) and returns how the call failed."""
    if method in STREAMING:
        stream = channel.unary_stream(f"{SERVICE}/{method}")(body, metadata=metadata, timeout=10)

        async def drain() -> list[Any]:
            return [message async for message in stream]

        return await failure_of(drain())
    return await failure_of(channel.unary_unary(f"{SERVICE}/{method}")(body, metadata=metadata, timeout=10))


async def rpc_codes(logs: CapturedLogs, calls: int) -> list[Any]:
    """The codes of the first `calls` rpc lines: a call's line is written just after its answer is sent."""
    for _ in range(250):
        codes = [line.get("code") for line in logs.lines if line.get("event") == "rpc"]
        if len(codes) >= calls:
            return codes
        await asyncio.sleep(0.02)
    return codes


CASES = [
    (method, name, body)
    for method, request_type in {**UNARY, **STREAMING}.items()
    for name, body in bad_bodies(request_type).items()
]


@pytest.mark.parametrize(("method", "name", "body"), CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
async def test_a_body_that_does_not_parse_is_unauthenticated_without_a_token_and_invalid_with_one(
    services: Services, method: str, name: str, body: bytes
) -> None:
    user_token = mint_token(DEV_JWT_SECRET, user_id=new_user())
    service_token = mint_token(DEV_JWT_SECRET, service_role=True)
    async with grpc.aio.insecure_channel(services.target) as channel:
        with captured_logs() as logs:
            anonymous = await raw_call(channel, method, body, ())
            wrong = await raw_call(channel, method, body, bearer("not-a-token"))
            as_user = await raw_call(channel, method, body, bearer(user_token))
            as_service = await raw_call(channel, method, body, bearer(service_token))
            codes = await rpc_codes(logs, 4)

    assert (anonymous.code, wrong.code) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    for failure in (as_user, as_service):
        assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "UNDECODABLE_REQUEST")
        assert not [word for word in DECODER_WORDS if word in failure.message.lower()], failure.message
    assert codes == ["UNAUTHENTICATED"] * 2 + ["INVALID_ARGUMENT"] * 2, [
        (line.get("event"), line.get("code"), line.get("method")) for line in logs.lines
    ]
    assert not logs.tracebacks()


@pytest.mark.parametrize("token", ["none", "user"])
async def test_a_one_mebibyte_job_id_grows_the_log_by_a_bounded_amount(services: Services, token: str) -> None:
    metadata = bearer(mint_token(DEV_JWT_SECRET, user_id=new_user())) if token == "user" else ()
    job_id = "j" * (1 << 20)
    async with grpc.aio.insecure_channel(services.target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        with captured_logs() as logs:
            for _ in range(3):
                failure = await failure_of(stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata, timeout=10))
                assert failure.code == ("UNAUTHENTICATED" if token == "none" else "INVALID_ARGUMENT")
                assert len(failure.message) <= 300
            await rpc_codes(logs, 3)
    lines = [line for line in logs.lines if line.get("event") == "rpc"]
    assert all("characters cut]" in str(line["job_id"]) for line in lines)
    assert logs.size() < 3 * 2_000, "about a line's worth a call, not a mebibyte"
