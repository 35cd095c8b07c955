"""ListJobs: newest first, page_size default 20 and at most 100, opaque tokens that walk every page once,
a state filter, and tokens that only work with the filter they were made for."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_client import ImageGenClient
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from job_service import server as job_server
from tests.support.logs import captured_logs
from tests.support.rpc_errors import failure_of
from tests.support.services import Services, new_user, running_services

JOBS = 120
CANCELLED = 7


@dataclass
class Listing:
    services: Services
    user: str
    newest_first: list[str]  # every job id of the user, newest first
    cancelled: set[str]


@pytest.fixture(scope="module")
async def listing(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Listing]:
    # No dispatching, so the jobs keep the state the test gives them.
    job = {"max_in_flight": 0, "active_jobs_per_user": 1000, "new_user_credits": 1000}
    async with running_services(database_url, tmp_path_factory.mktemp("list"), job=job) as services:
        user = new_user()
        async with services.client(user) as client:
            created = [(await client.create_job(f"job {i}", sample_count=1)).id for i in range(JOBS)]
            cancelled = set(created[5 : 5 + CANCELLED])
            for job_id in cancelled:
                await client.cancel_job(job_id)
        yield Listing(services, user, list(reversed(created)), cancelled)


async def walk(client: ImageGenClient, *, page_size: int = 0, state: int = 0) -> list[list[str]]:
    """Every page, following next_page_token until it is empty."""
    pages: list[list[str]] = []
    token = ""
    while True:
        response = await client.list_jobs(page_token=token, page_size=page_size, state=state)
        pages.append([job.id for job in response.jobs])
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "the walk must end"


async def test_default_page_size_is_20_and_pages_cover_everything_once_newest_first(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        pages = await walk(client)
    assert [len(page) for page in pages] == [20] * 6
    assert [job_id for page in pages for job_id in page] == listing.newest_first


async def test_page_size_is_capped_at_100(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        first = await client.list_jobs(page_size=1000)
        rest = await client.list_jobs(page_size=1000, page_token=first.next_page_token)
    assert len(first.jobs) == 100 and first.next_page_token
    assert len(rest.jobs) == JOBS - 100 and not rest.next_page_token
    assert [j.id for j in [*first.jobs, *rest.jobs]] == listing.newest_first


async def test_odd_page_size_walks_without_duplicates_or_gaps(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        pages = await walk(client, page_size=7)
    assert [len(page) for page in pages] == [7] * 17 + [1]
    assert [job_id for page in pages for job_id in page] == listing.newest_first


async def test_state_filter(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        cancelled = await walk(client, state=pb.JOB_STATE_CANCELLED, page_size=3)
        pending = await walk(client, state=pb.JOB_STATE_PENDING, page_size=50)
        completed = await client.list_jobs(state=pb.JOB_STATE_COMPLETED)
        one = await client.list_jobs(state=pb.JOB_STATE_CANCELLED, page_size=1)
    assert [job_id for page in cancelled for job_id in page] == [
        j for j in listing.newest_first if j in listing.cancelled
    ]
    assert [len(page) for page in cancelled] == [3, 3, 1]
    assert [job_id for page in pending for job_id in page] == [
        j for j in listing.newest_first if j not in listing.cancelled
    ]
    assert list(completed.jobs) == [] and not completed.next_page_token
    assert one.jobs[0].state == pb.JOB_STATE_CANCELLED


async def test_a_token_only_works_with_its_own_filter_and_caller(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        unfiltered = await client.list_jobs(page_size=5)
        filtered = await client.list_jobs(page_size=2, state=pb.JOB_STATE_CANCELLED)
        with_other_filter = await failure_of(
            client.list_jobs(page_token=unfiltered.next_page_token, state=pb.JOB_STATE_PENDING)
        )
        without_filter = await failure_of(client.list_jobs(page_token=filtered.next_page_token))
    async with listing.services.client(new_user()) as stranger:
        someone_elses = await failure_of(stranger.list_jobs(page_token=unfiltered.next_page_token))

    for failure in (with_other_filter, without_filter, someone_elses):
        assert (failure.code, failure.reason, list(failure.violations)) == (
            "INVALID_ARGUMENT",
            "INVALID_PAGE_TOKEN",
            ["page_token"],
        )


async def test_jobs_created_while_paging_do_not_shift_the_pages(listing: Listing) -> None:
    async with listing.services.client(listing.user) as client:
        first = await client.list_jobs(page_size=30)
        newer = await client.create_job("made while paging", sample_count=1)
        rest = await walk_from(client, first.next_page_token, page_size=30)
        await client.cancel_job(newer.id)
        listing.cancelled.add(newer.id)
        listing.newest_first.insert(0, newer.id)
    seen = [j.id for j in first.jobs] + rest
    assert newer.id not in seen
    assert seen == listing.newest_first[1:]


async def walk_from(client: ImageGenClient, token: str, *, page_size: int) -> list[str]:
    ids: list[str] = []
    while token:
        response = await client.list_jobs(page_size=page_size, page_token=token)
        ids += [job.id for job in response.jobs]
        token = response.next_page_token
    return ids


async def test_service_role_lists_a_given_users_jobs(listing: Listing) -> None:
    async with listing.services.service_client() as service:
        response = await service.list_jobs(user_id=listing.user, page_size=10)
    assert [j.id for j in response.jobs] == listing.newest_first[:10]
    assert all(j.user_id == listing.user for j in response.jobs)


def tampered(token: str) -> str:
    """The token with the position it names moved a year on, its other parts (a signature, if any) left as made."""
    body_text = token.split(".")[0]
    body = json.loads(base64.urlsafe_b64decode(body_text + "=" * (-len(body_text) % 4)))
    body["t"] = body["t"].replace("20", "21", 1)
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
    return forged + token[len(body_text) :]


async def test_page_tokens_not_made_for_this_caller_and_filter_are_refused_without_a_traceback(
    listing: Listing,
) -> None:
    async with listing.services.client(listing.user) as client:
        token = (await client.list_jobs(page_size=5)).next_page_token
        deep = base64.urlsafe_b64encode(b"[" * 100_000).decode()
        with captured_logs() as logs:
            failures = {
                "nested": await failure_of(client.list_jobs(page_token=deep)),
                "raw brackets": await failure_of(client.list_jobs(page_token="[" * 100_000)),
                "over-long": await failure_of(client.list_jobs(page_token=token + "A" * 1000)),
                "tampered": await failure_of(client.list_jobs(page_token=tampered(token))),
            }
    async with listing.services.client(new_user()) as stranger:
        failures["another user's"] = await failure_of(stranger.list_jobs(page_token=token))

    for name, failure in failures.items():
        assert (failure.code, failure.reason, list(failure.violations)) == (
            "INVALID_ARGUMENT",
            "INVALID_PAGE_TOKEN",
            ["page_token"],
        ), name
        assert len(failure.message) < 300, name
    assert not logs.tracebacks()


async def test_a_page_token_from_one_replica_pages_on_another(listing: Listing) -> None:
    # A second JobService with the same settings (the same secret): a token one made, the other reads.
    other = await job_server.start(listing.services.job.settings)
    token = mint_token(DEV_JWT_SECRET, user_id=listing.user)
    try:
        async with listing.services.client(listing.user) as here:
            first = await here.list_jobs(page_size=50)
        async with ImageGenClient(f"127.0.0.1:{other.port}", token) as there:
            rest = await walk_from(there, first.next_page_token, page_size=50)
    finally:
        await other.stop()
    assert [j.id for j in first.jobs] + rest == listing.newest_first
