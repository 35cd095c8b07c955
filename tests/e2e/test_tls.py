"""Transport security end to end: TLS to JobService, mutual TLS between the services, refusals, plaintext rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from imagegen.generator.v1 import generator_service_pb2 as gen_pb
from imagegen.generator.v1 import generator_service_pb2_grpc as gen_grpc
from imagegen.job.v1 import job_service_pb2 as pb

from generator_service import server as generator_server
from imagegen_client import ImageGenClient, ImageGenSyncClient, RetryPolicy
from imagegen_common import healthcheck
from imagegen_common.dev_tokens import mint_token
from imagegen_common.transport import PlaintextRefusedError, check_client, check_listener
from job_service import server as job_server
from tests.support.certs import CertificateAuthority, Pem
from tests.support.services import Services, generator_settings, job_settings, new_user, running_services

ONCE = RetryPolicy(attempts=1)


@dataclass
class Pki:
    ca: CertificateAuthority
    job_server: Pem
    generator_server: Pem
    job_as_client: Pem  # JobService's client certificate for the generator hop
    stranger: Pem  # a client certificate from another CA
    other_ca: CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(folder, "imagegen-ca"), CertificateAuthority(folder, "other-ca")
    return Pki(
        ca,
        ca.issue("job", server=True),
        ca.issue("generator", server=True),
        ca.issue("job-client", server=False),
        other.issue("stranger", server=False),
        other,
    )


@pytest.fixture
async def tls_services(database_url: str, tmp_path: Path, pki: Pki) -> AsyncIterator[Services]:
    async with running_services(
        database_url,
        tmp_path,
        generator={
            "tls_cert": pki.generator_server.cert,
            "tls_key": pki.generator_server.key,
            "tls_client_ca": pki.ca.pem.cert,  # mutual TLS: only clients with a certificate of our CA
            "allow_plaintext": False,
        },
        job={
            "tls_cert": pki.job_server.cert,
            "tls_key": pki.job_server.key,
            "generator_tls_ca": pki.ca.pem.cert,
            "generator_tls_cert": pki.job_as_client.cert,
            "generator_tls_key": pki.job_as_client.key,
            "allow_plaintext": False,
        },
    ) as services:
        yield services


async def test_a_job_runs_over_tls_with_mutual_tls_between_the_services(tls_services: Services, pki: Pki) -> None:
    token = mint_token(user_id=new_user())
    async with ImageGenClient(tls_services.target, token, root_certificates=pki.ca.pem.cert_bytes) as client:
        job = await client.create_job("over TLS", sample_count=1)
        done = await client.wait(job.id, timeout=60)
    assert done.state == pb.JOB_STATE_COMPLETED, done.error

    # The sync client over TLS sees the same job.
    def fetch() -> pb.Job:
        with ImageGenSyncClient(tls_services.target, token, root_certificates=pki.ca.pem.cert_bytes) as sync:
            return sync.get_job(job.id)

    assert (await asyncio.to_thread(fetch)).state == pb.JOB_STATE_COMPLETED


async def test_plaintext_and_untrusted_connections_to_job_service_are_refused(tls_services: Services, pki: Pki) -> None:
    token = mint_token(user_id=new_user())
    async with ImageGenClient(tls_services.target, token, retry=ONCE) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plaintext.list_templates(timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    wrong_ca = pki.other_ca.pem.cert_bytes  # a server certificate we cannot verify
    async with ImageGenClient(tls_services.target, token, root_certificates=wrong_ca, retry=ONCE) as untrusting:
        with pytest.raises(grpc.aio.AioRpcError) as unverified:
            await untrusting.list_templates(timeout=5)
    assert unverified.value.code() == grpc.StatusCode.UNAVAILABLE


async def list_models(target: str, pki: Pki, client: Pem | None) -> gen_pb.ListModelsResponse:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.pem.cert_bytes,
        client.key_bytes if client else None,
        client.cert_bytes if client else None,
    )
    async with grpc.aio.secure_channel(target, credentials) as channel:
        response: gen_pb.ListModelsResponse = await gen_grpc.GeneratorServiceStub(channel).ListModels(
            gen_pb.ListModelsRequest(), timeout=5
        )
        return response


async def test_the_generator_accepts_only_client_certificates_of_its_ca(tls_services: Services, pki: Pki) -> None:
    target = f"127.0.0.1:{tls_services.generator.port}"
    assert [m.id for m in (await list_models(target, pki, pki.job_as_client)).models] == ["local"]
    for client in (pki.stranger, None):  # signed by another CA; no certificate at all
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_models(target, pki, client)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await gen_grpc.GeneratorServiceStub(channel).ListModels(gen_pb.ListModelsRequest(), timeout=5)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

    # The compose-style health probe works over mutual TLS with the right certificate, and only with it.
    def probe(client: Pem | None) -> str:
        return healthcheck.check(
            target, ca=pki.ca.pem.cert, cert=client.cert if client else None, key=client.key if client else None
        )

    assert await asyncio.to_thread(probe, pki.job_as_client) == "SERVING"
    assert (await asyncio.to_thread(probe, pki.stranger)).startswith("UNREACHABLE")


async def test_job_service_with_a_client_certificate_of_another_ca_cannot_generate(
    database_url: str, tmp_path: Path, pki: Pki
) -> None:
    """The mTLS hop itself: a JobService holding the wrong certificate gets nothing out of the generator."""
    async with (
        running_services(
            database_url,
            tmp_path,
            generator={
                "tls_cert": pki.generator_server.cert,
                "tls_key": pki.generator_server.key,
                "tls_client_ca": pki.ca.pem.cert,
            },
            job={
                "generator_tls_ca": pki.ca.pem.cert,
                "generator_tls_cert": pki.stranger.cert,
                "generator_tls_key": pki.stranger.key,
                "retry_base_seconds": 60.0,  # so the job is still waiting for its retry when we look
                "retry_max_seconds": 60.0,
            },
        ) as services,
        services.client() as client,
    ):
        job = await client.create_job("wrong certificate", sample_count=1)
        async for update in client.watch(job.id):
            if update.event.type == pb.JOB_EVENT_TYPE_RETRY_SCHEDULED:
                break  # the attempt could not reach the generator
        refused = await client.get_job(job.id)
        await client.cancel_job(job.id)
    assert refused.state == pb.JOB_STATE_PENDING and refused.error.reason == "GENERATOR_UNAVAILABLE"
    assert not refused.images


async def test_plaintext_beyond_loopback_needs_an_explicit_setting(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(PlaintextRefusedError, match="JOB_ALLOW_PLAINTEXT"):
        await job_server.start(job_settings(database_url, "127.0.0.1:1", host="0.0.0.0"))
    with pytest.raises(PlaintextRefusedError, match="GEN_ALLOW_PLAINTEXT"):
        await generator_server.start(generator_settings(tmp_path, host="0.0.0.0"))
    with pytest.raises(PlaintextRefusedError, match="JOB_ALLOW_PLAINTEXT"):
        await job_server.start(job_settings(database_url, "dns:///generator:50052"))
    with pytest.raises(PlaintextRefusedError):  # false means never, loopback included
        await generator_server.start(generator_settings(tmp_path, allow_plaintext=False))

    check_listener("0.0.0.0", tls=False, allow_plaintext=True, setting="X")  # asked for: allowed
    check_listener("0.0.0.0", tls=True, allow_plaintext=False, setting="X")  # TLS: always fine
    check_listener("127.0.0.1", tls=False, allow_plaintext=None, setting="X")  # loopback: the dev default
    check_client("ipv4:127.0.0.1:1,127.0.0.1:2", tls=False, allow_plaintext=None, setting="X")
    check_client("dns:///generator:50052", tls=False, allow_plaintext=True, setting="X")
