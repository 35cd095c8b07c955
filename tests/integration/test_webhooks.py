"""Signed webhooks end to end: real services, a real HTTP receiver on 127.0.0.1, signatures checked per the spec."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import verify_webhook
from tests.generator.fake_http import Exchange, Reply
from tests.support.processes import free_port
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, new_user, running_services
from tests.support.webhooks import Receiver, eventually, new_secret, spec_signature_valid

CURRENT, OLD = new_secret(), new_secret()
ALL_EVENTS = ["started", "image_stored", "completed", "failed", "cancelled"]
FAST_RETRIES = {
    "webhook_secrets": [CURRENT, OLD],
    "webhook_allow_http": True,
    "webhook_allow_private": True,
    "webhook_retry_base_seconds": 0.1,
    "webhook_retry_max_seconds": 0.5,
    "webhook_timeout_seconds": 2.0,
}


@pytest.fixture(autouse=True)
async def no_delivery_outlives_its_test(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Ends whatever a test left pending: the database is shared, and a later test's receiver may get a port an
    earlier one had, so a stray retry must not reach it."""
    yield
    await db.execute("UPDATE webhook_deliveries SET state = 'failed', ended_at = now() WHERE state = 'pending'")


@pytest.fixture
async def services(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    async with running_services(database_url, tmp_path, job=FAST_RETRIES) as running:
        yield running


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver().start()
    yield receiver
    await receiver.stop()


async def settled_deliveries(services: Services, job_id: str, count: int, within: float) -> list[pb.WebhookDelivery]:
    """The job's deliveries once `count` exist and none is pending."""
    found: list[pb.WebhookDelivery] = []

    async def done() -> bool:
        nonlocal found
        async with services.service_client() as client:
            found = await client.list_webhook_deliveries(job_id)
        return len(found) >= count and all(d.state != pb.WEBHOOK_DELIVERY_STATE_PENDING for d in found)

    await eventually(done, within, f"{count} settled deliveries of job {job_id}")
    return found


async def finished(services: Services, job_id: str) -> pb.Job:
    async with services.service_client() as client:
        async for update in client.watch(job_id):
            job = update.job
    return job


async def test_every_delivery_is_signed_per_the_spec_with_each_secret_of_a_rotation(
    services: Services, receiver: Receiver
) -> None:
    async with services.client() as client:
        job = await client.create_job(
            "a lighthouse", sample_count=2, webhook_url=receiver.url, webhook_events=ALL_EVENTS
        )
        assert job.webhook_url == receiver.url
        assert set(job.webhook_events) == {
            pb.WEBHOOK_EVENT_STARTED,
            pb.WEBHOOK_EVENT_IMAGE_STORED,
            pb.WEBHOOK_EVENT_COMPLETED,
            pb.WEBHOOK_EVENT_FAILED,
            pb.WEBHOOK_EVENT_CANCELLED,
        }
        deliveries = await settled_deliveries(services, job.id, 4, within=20)
        final = await client.get_job(job.id)
        listed = await client.list_webhook_deliveries(job.id)

    requests = receiver.requests
    payloads = receiver.payloads()
    assert [p["type"] for p in payloads] == ["job.started", "job.image_stored", "job.image_stored", "job.completed"]
    now = time.time()
    for request in requests:
        assert request.method == "POST" and request.path == "/hooks/imagegen" and request.query == {"token": ["abc"]}
        assert request.headers["content-type"] == "application/json"
        # Rotation: one v1 signature per configured secret, each valid on its own.
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        assert spec_signature_valid(CURRENT, request), request.headers
        assert spec_signature_valid(OLD, request), request.headers
        assert not spec_signature_valid(new_secret(), request)
        assert abs(now - int(request.headers["webhook-timestamp"])) < 60
        assert "." not in request.headers["webhook-id"]
        # The library's helper agrees and returns the payload.
        assert verify_webhook(CURRENT, request.headers, request.body)["data"]["id"] == job.id
    assert len({r.headers["webhook-id"] for r in requests}) == 4, "one id per event"

    # The data is the job as GetJob returns it (protobuf JSON), as the event left it.
    assert all(p["data"]["id"] == job.id and p["data"]["webhookUrl"] == receiver.url for p in payloads)
    assert payloads[0]["data"]["state"] == "JOB_STATE_GENERATING"
    assert [len(p["data"].get("images", [])) for p in payloads[1:3]] == [1, 2]
    assert payloads[3]["data"]["state"] == "JOB_STATE_COMPLETED"
    assert payloads[3]["data"]["images"] == json.loads(json.dumps(_images_json(final)))
    assert payloads[3]["timestamp"].endswith("Z")

    assert [d.id for d in deliveries] == [r.headers["webhook-id"] for r in requests]
    assert [d.event for d in listed] == [
        pb.WEBHOOK_EVENT_STARTED,
        pb.WEBHOOK_EVENT_IMAGE_STORED,
        pb.WEBHOOK_EVENT_IMAGE_STORED,
        pb.WEBHOOK_EVENT_COMPLETED,
    ]
    for delivery in listed:
        assert delivery.state == pb.WEBHOOK_DELIVERY_STATE_DELIVERED
        assert [(a.attempt, a.http_status, a.error) for a in delivery.attempts] == [(1, 200, "")]
        assert delivery.HasField("end_time") and not delivery.HasField("next_attempt_time")


def _images_json(job: pb.Job) -> list[dict[str, Any]]:
    from google.protobuf import json_format

    return [json_format.MessageToDict(image) for image in job.images]


async def test_without_events_only_the_end_is_sent(services: Services, receiver: Receiver) -> None:
    async with services.client() as client:
        job = await client.create_job("a lighthouse", sample_count=1, webhook_url=receiver.url)
        assert set(job.webhook_events) == {
            pb.WEBHOOK_EVENT_COMPLETED,
            pb.WEBHOOK_EVENT_FAILED,
            pb.WEBHOOK_EVENT_CANCELLED,
            pb.WEBHOOK_EVENT_EXPIRED,
        }
    await settled_deliveries(services, job.id, 1, within=20)
    assert [p["type"] for p in receiver.payloads()] == ["job.completed"]


async def test_a_cancelled_job_sends_started_then_cancelled(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    slow = {"local_latency_min_seconds": 3.0, "local_latency_max_seconds": 3.0}
    async with running_services(database_url, tmp_path, job=FAST_RETRIES, generator=slow) as services:
        async with services.client() as client:
            job = await client.create_job(
                "a lighthouse", sample_count=1, webhook_url=receiver.url, webhook_events=["started", "cancelled"]
            )
            await eventually(lambda: _has(receiver, 1), 10, "job.started delivered")
            await client.cancel_job(job.id)
            final = await finished(services, job.id)
        assert final.state == pb.JOB_STATE_CANCELLED
        await settled_deliveries(services, job.id, 2, within=20)
    assert [p["type"] for p in receiver.payloads()] == ["job.started", "job.cancelled"]
    assert receiver.payloads()[1]["data"]["state"] == "JOB_STATE_CANCELLED"


async def _has(receiver: Receiver, count: int) -> bool:
    return len(receiver.requests) >= count


async def test_a_receiver_that_is_down_gets_every_event_in_order_once_it_is_back(services: Services) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    async with services.client() as client:
        job = await client.create_job("a lighthouse", sample_count=3, webhook_url=url, webhook_events=ALL_EVENTS)
        final = await finished(services, job.id)
        assert final.state == pb.JOB_STATE_COMPLETED, "the job does not wait for its webhook"

        async def retried() -> bool:
            deliveries = await client.list_webhook_deliveries(job.id)
            return bool(deliveries) and len(deliveries[0].attempts) >= 3

        await eventually(retried, 15, "the first delivery retried while the receiver is down")
        down = await client.list_webhook_deliveries(job.id)
        assert all(d.state == pb.WEBHOOK_DELIVERY_STATE_PENDING for d in down)
        assert all(not d.attempts for d in down[1:]), "later events wait for the first: in order per job"
        first = down[0].attempts
        assert all(a.http_status == 0 and "Connect" in a.error for a in first), first
        gaps = [b.time.ToMilliseconds() - a.time.ToMilliseconds() for a, b in itertools.pairwise(first)]
        assert all(gap >= 40 for gap in gaps), f"backoff between sends: {gaps}"

        receiver = await Receiver().start(port)
        try:
            deliveries = await settled_deliveries(services, job.id, 5, within=20)
        finally:
            await receiver.stop()
    assert all(d.state == pb.WEBHOOK_DELIVERY_STATE_DELIVERED for d in deliveries)
    types = [json.loads(r.body)["type"] for r in receiver.first_of_each()]
    assert types == ["job.started", *["job.image_stored"] * 3, "job.completed"]
    assert [r.headers["webhook-id"] for r in receiver.first_of_each()] == [d.id for d in deliveries]
    assert all(spec_signature_valid(CURRENT, r) for r in receiver.requests)


async def test_a_receiver_that_never_answers_ends_as_a_recorded_failure_without_slowing_jobs(
    database_url: str, tmp_path: Path
) -> None:
    hung = asyncio.Event()

    async def never(exchange: Exchange) -> Reply:
        await hung.wait()  # set at the end, so the server can stop
        return Reply(200)

    silent = await Receiver(never).start()
    healthy = await Receiver().start()
    settings = {
        **FAST_RETRIES,
        # A job that waited for its webhooks would take at least the 10 s a delivery is retried for.
        "webhook_timeout_seconds": 1.0,
        "webhook_retry_for_seconds": 10.0,
        "active_jobs_per_user": 10,
    }
    try:
        async with running_services(database_url, tmp_path, job=settings) as services:
            async with services.client() as client:
                began = time.monotonic()
                hooked = [
                    await client.create_job(
                        "a lighthouse", sample_count=1, webhook_url=silent.url, webhook_events=ALL_EVENTS
                    )
                    for _ in range(3)
                ]
                plain = await client.create_job("a lighthouse", sample_count=1)
                other = await client.create_job("a lighthouse", sample_count=1, webhook_url=healthy.url)
                ends = await asyncio.gather(*(finished(services, j.id) for j in [*hooked, plain, other]))
                took = time.monotonic() - began
                assert all(j.state == pb.JOB_STATE_COMPLETED for j in ends)
                assert took < 8.0, f"jobs took {took:.1f}s with a receiver that never answers"
                # Another job's webhook goes out while the silent receiver's deliveries are still being retried.
                await asyncio.wait_for(healthy.arrived.wait(), timeout=5.0)
                assert silent.requests, "the silent receiver was sent to"
                undelivered = await client.list_webhook_deliveries(hooked[0].id)
                assert undelivered[0].state == pb.WEBHOOK_DELIVERY_STATE_PENDING

                deliveries = await settled_deliveries(services, hooked[0].id, 1, within=40)
            first = deliveries[0]
            assert first.state == pb.WEBHOOK_DELIVERY_STATE_FAILED
            assert len(first.attempts) >= 2
            assert all(a.http_status == 0 and "no answer within 1s" in a.error for a in first.attempts)
            assert all(a.duration_seconds < 3.0 for a in first.attempts), "each send is cut at the timeout"
            assert first.last_error
            assert services.job.registry is not None
            failed = services.job.registry.get_sample_value("imagegen_webhook_deliveries_total", {"outcome": "failed"})
            timeouts = services.job.registry.get_sample_value("imagegen_webhook_attempts_total", {"outcome": "timeout"})
            assert failed is not None and failed >= 1
            assert timeouts is not None and timeouts >= 2
    finally:
        hung.set()
        await silent.stop()
        await healthy.stop()


async def test_sends_are_bounded_per_replica_and_handed_back_at_shutdown(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    hung = asyncio.Event()

    async def never(exchange: Exchange) -> Reply:
        await hung.wait()
        return Reply(200)

    silent = await Receiver(never).start()
    settings = {**FAST_RETRIES, "webhook_concurrency": 2, "webhook_timeout_seconds": 30.0}
    try:
        async with running_services(database_url, tmp_path, job=settings) as services:
            async with services.client() as client:
                jobs = [await client.create_job("x", sample_count=1, webhook_url=silent.url) for _ in range(4)]
                await asyncio.gather(*(finished(services, j.id) for j in jobs))
            await eventually(lambda: _has(silent, 2), 10, "two sends under way")
            await asyncio.sleep(1.0)
            assert silent.http.max_in_flight == 2, "JOB_WEBHOOK_CONCURRENCY=2 sends at once"
        ids = [j.id for j in jobs]
        held = await db.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE job_id = ANY($1::uuid[]) AND lease_owner IS NOT NULL", ids
        )
        pending = await db.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE job_id = ANY($1::uuid[]) AND state = 'pending'", ids
        )
        assert (held, pending) == (0, 4), "a stopping replica hands its sends back, due at once elsewhere"
    finally:
        hung.set()
        await silent.stop()


async def test_a_receiver_answering_410_is_given_up_at_once(services: Services) -> None:
    gone = await Receiver().start()
    gone.status = 410
    try:
        async with services.client() as client:
            job = await client.create_job("a lighthouse", sample_count=1, webhook_url=gone.url)
        deliveries = await settled_deliveries(services, job.id, 1, within=20)
    finally:
        await gone.stop()
    assert deliveries[0].state == pb.WEBHOOK_DELIVERY_STATE_FAILED
    assert [a.http_status for a in deliveries[0].attempts] == [410]


async def test_webhook_fields_are_validated(services: Services) -> None:
    async with services.client() as client:
        too_long = await failure_of(client.create_job("x", webhook_url="https://example.com/" + "a" * 2100))
        assert too_long.code == "INVALID_ARGUMENT" and "webhook_url" in too_long.violations
        events_alone = await failure_of(client.create_job("x", webhook_events=["completed"]))
        assert "webhook_events" in events_alone.violations
        unknown = await failure_of(client.create_job("x", webhook_url="https://example.com/h", webhook_events=[99]))
        assert "webhook_events" in unknown.violations
        for bad in ("ftp://example.com/h", "https://user:pw@example.com/h", "https:///nohost", "https://a b.com/"):
            failure = await failure_of(client.create_job("x", webhook_url=bad))
            assert failure.code == "INVALID_ARGUMENT" and "webhook_url" in failure.violations, bad


async def test_another_users_deliveries_are_not_found(services: Services, receiver: Receiver) -> None:
    async with services.client() as owner, services.client(new_user()) as stranger:
        job = await owner.create_job("a lighthouse", sample_count=1, webhook_url=receiver.url)
        failure = await failure_of(stranger.list_webhook_deliveries(job.id))
    assert failure.code == "NOT_FOUND" and failure.reason == "JOB_NOT_FOUND"


@pytest.fixture
async def guarded(database_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    """Services as deployed: private addresses refused (http allowed, to show the address check on its own)."""
    settings = {**FAST_RETRIES, "webhook_allow_private": False}
    async with running_services(database_url, tmp_path, job=settings) as running:
        yield running


SSRF_URLS = [
    "http://127.0.0.1:8080/hook",
    "http://127.1/hook",
    "http://0x7f000001/hook",
    "http://2130706433/hook",
    "http://[::1]/hook",
    "http://10.0.0.7/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://100.64.0.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://[fe80::1]/hook",
    "http://224.0.0.1/hook",
    "http://0.0.0.0/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[64:ff9b::a00:1]/hook",
]


async def test_ssrf_targets_are_refused_at_create(guarded: Services) -> None:
    async with guarded.client() as client:
        for url in SSRF_URLS:
            failure = await failure_of(client.create_job("x", webhook_url=url))
            assert failure.code == "INVALID_ARGUMENT", url
            assert failure.reason == "INVALID_ARGUMENT"
            assert "webhook_url" in failure.violations, (url, failure.violations)


async def test_a_name_that_resolves_to_loopback_is_refused_when_sent(guarded: Services, receiver: Receiver) -> None:
    url = f"http://localhost:{receiver.http.port}/hook"
    async with guarded.client() as client:
        job = await client.create_job("a lighthouse", sample_count=1, webhook_url=url)
        final = await finished(guarded, job.id)
    assert final.state == pb.JOB_STATE_COMPLETED
    deliveries = await settled_deliveries(guarded, job.id, 1, within=20)
    assert deliveries[0].state == pb.WEBHOOK_DELIVERY_STATE_FAILED
    assert len(deliveries[0].attempts) == 1, "refused addresses are not retried"
    assert "refused" in deliveries[0].attempts[0].error and "127.0.0.1" in deliveries[0].last_error
    assert receiver.requests == [], "nothing reached the loopback receiver"


async def test_webhooks_are_refused_when_no_secret_is_configured(database_url: str, tmp_path: Path) -> None:
    async with running_services(database_url, tmp_path) as services, services.client() as client:
        failure = await failure_of(client.create_job("x", webhook_url="https://example.com/hook"))
    assert failure.code == "FAILED_PRECONDITION" and failure.reason == "WEBHOOKS_DISABLED"


async def test_cli_generate_with_webhook_and_jobs_webhooks(
    services: Services, receiver: Receiver, tmp_path: Path
) -> None:
    from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
    from tests.integration.test_clients_and_cli import cli

    token = mint_token(DEV_JWT_SECRET, user_id=new_user())
    code, _out, err = await cli(
        services.target,
        token,
        "generate",
        "a fox",
        "-n",
        "1",
        "--out",
        str(tmp_path / "images"),
        "--webhook",
        receiver.url,
        "--webhook-event",
        "started",
        "--webhook-event",
        "job.completed",
    )
    assert code == 0, err
    job_id = next(line.split()[1] for line in err.splitlines() if line.startswith("job "))
    await settled_deliveries(services, job_id, 2, within=20)
    assert [p["type"] for p in receiver.payloads()] == ["job.started", "job.completed"]

    code, listed, err = await cli(services.target, token, "jobs", "webhooks", job_id)
    assert code == 0, err
    assert listed.count("DELIVERED") == 2 and "200" in listed and "completed" in listed

    code, _, err = await cli(services.target, token, "generate", "x", "--webhook", receiver.url, "--webhook-event", "x")
    assert code != 0 and "unknown webhook event" in err


async def test_sync_client_lists_deliveries(services: Services, receiver: Receiver) -> None:
    from imagegen_client import ImageGenSyncClient
    from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token

    token = mint_token(DEV_JWT_SECRET, user_id=new_user())

    def session() -> list[pb.WebhookDelivery]:
        with ImageGenSyncClient(services.target, token) as client:
            job = client.create_job("a fox", sample_count=1, webhook_url=receiver.url, webhook_events=["completed"])
            client.wait(job.id, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                deliveries = client.list_webhook_deliveries(job.id)
                if deliveries and deliveries[0].state == pb.WEBHOOK_DELIVERY_STATE_DELIVERED:
                    return deliveries
                time.sleep(0.1)
            return client.list_webhook_deliveries(job.id)

    deliveries = await asyncio.to_thread(session)
    assert [(d.event, d.state) for d in deliveries] == [
        (pb.WEBHOOK_EVENT_COMPLETED, pb.WEBHOOK_DELIVERY_STATE_DELIVERED)
    ]
