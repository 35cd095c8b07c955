"""WatchJob streams are capped per user and per connection, and everything a stream holds is given back when
it ends: the counts go back to zero and the maps behind them (and the job feeds, and the shared responses)
are empty once the streams are closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.cluster import eventually
from tests.support.rpc_errors import RpcFailure, read_failure
from tests.support.services import Services, new_user, running_services

PER_USER, PER_CONNECTION = 3, 5


@pytest.fixture(scope="module")
async def services(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Services]:
    # No dispatching: the watched jobs stay pending, so their streams stay open until the test closes them.
    job = {
        "max_in_flight": 0,
        "watch_streams_per_user": PER_USER,
        "watch_streams_per_connection": PER_CONNECTION,
    }
    async with running_services(database_url, tmp_path_factory.mktemp("watch"), job=job) as s:
        yield s


class Watcher:
    """One user's WatchJob streams on one channel, each open once its first message (the snapshot) came."""

    def __init__(self, channel: grpc.aio.Channel, user: str, job_id: str) -> None:
        self._stub = pb_grpc.JobServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {mint_token(DEV_JWT_SECRET, user_id=user)}"),)
        self._job_id = job_id
        self.streams: list[Any] = []

    async def open(self) -> None:
        stream = self._stub.WatchJob(pb.WatchJobRequest(job_id=self._job_id), metadata=self._metadata, timeout=60)
        first = await stream.read()
        assert first.job.id == self._job_id
        self.streams.append(stream)

    async def refused(self) -> RpcFailure:
        stream = self._stub.WatchJob(pb.WatchJobRequest(job_id=self._job_id), metadata=self._metadata, timeout=60)
        try:
            await stream.read()
        except grpc.aio.AioRpcError as error:
            return read_failure(error)
        raise AssertionError("the stream was opened")

    def close(self) -> None:
        for stream in self.streams:
            stream.cancel()


async def a_pending_job(services: Services, user: str) -> str:
    async with services.client(user) as client:
        return (await client.create_job("watched", sample_count=1)).id


async def test_streams_past_either_cap_are_refused_and_all_state_is_given_back_when_they_close(
    services: Services,
) -> None:
    app = services.job
    assert app.watch_streams is not None and app.servicer is not None
    users = [new_user() for _ in range(3)]
    jobs = [await a_pending_job(services, user) for user in users]
    # A local subchannel pool each: two channels to one target otherwise share one connection.
    first, second = (
        grpc.aio.insecure_channel(services.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(2)
    )
    a = Watcher(first, users[0], jobs[0])
    b_first, b_second = Watcher(first, users[1], jobs[1]), Watcher(second, users[1], jobs[1])
    c_second = Watcher(second, users[2], jobs[2])
    try:
        for _ in range(PER_USER):
            await a.open()
        per_user = await a.refused()
        for _ in range(PER_CONNECTION - PER_USER):
            await b_first.open()
        per_connection = await b_first.refused()
        await b_second.open()  # the user is under its cap, and the other connection under its own
        await c_second.open()
        assert app.watch_streams.open_streams == 7
        assert app.watch_streams.tracked() == (3, 2)
        assert app.notifications.watched_jobs() == 3
    finally:
        for watcher in (a, b_first, b_second, c_second):
            watcher.close()

    for failure, limit, cap in ((per_user, "per_user", PER_USER), (per_connection, "per_connection", PER_CONNECTION)):
        assert (failure.code, failure.reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_WATCH_STREAMS")
        assert failure.metadata == {"limit": limit, "max_streams": str(cap)}

    # Everything is given back once the streams are gone (the server hears of each cancel asynchronously).
    assert await eventually(lambda: asyncio.sleep(0, app.watch_streams.open_streams), lambda n: n == 0, within=10) == 0
    assert app.watch_streams.tracked() == (0, 0)
    assert app.notifications.watched_jobs() == 0
    assert app.servicer.cached_watch_responses() == 0
    # ...and the user can watch again.
    await a.open()
    a.close()
    await first.close()
    await second.close()
