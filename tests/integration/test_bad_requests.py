"""Bad requests, table-driven: each one is answered with its documented code and ErrorInfo reason (and field
violations where it is a validation error), leaves no row behind, and the server keeps serving.

One JobService for the whole module, configured so every rule can be hit: a JWKS with an RSA key next to
the HS256 secret, anonymous users refused, a generator model without 2K, a pricey model, and no
dispatching (max_in_flight 0) so jobs stay pending and count against the per-user cap.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from generator_service.config import ModelSpec
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.jwks import JwksServer, SigningKey, hand_made, hs256_signed_with_public_key, user_claims
from tests.support.ledger import assert_credits_consistent
from tests.support.rpc_errors import JOB_DOMAIN, failure_of
from tests.support.services import Services, new_user, running_services

ISSUER = "imagegen-dev"  # what mint_token puts in `iss`; the service is told to expect it
ACTIVE_CAP = 4


@dataclass
class World:
    services: Services
    stub: pb_grpc.JobServiceStub
    jwks: JwksServer
    rsa: SigningKey
    owner: str  # a user with a pending job and a cancelled one
    owner_job: str
    finished_job: str
    busy: str  # a user at the active-job cap
    reuser: str  # a user whose job was created with request_id "order-1"
    retired_template: str


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def as_user(user: str) -> tuple[tuple[str, str], ...]:
    return bearer(mint_token(DEV_JWT_SECRET, user_id=user))


def as_service() -> tuple[tuple[str, str], ...]:
    return bearer(mint_token(DEV_JWT_SECRET, service_role=True))


def create(world: World, metadata: Any, **fields: Any) -> Any:
    params = fields.pop("params", {})
    request = pb.CreateJobRequest(params=pb.GenerationParams(**params), **fields)
    return world.stub.CreateJob(request, metadata=metadata, timeout=10)


def create_as(user: str, **fields: Any) -> Callable[[World], Any]:
    return lambda w: create(w, as_user(user), **fields)


async def first_message(call: Any) -> Any:
    async for message in call:
        return message
    return None


def token_for(user: str, **claims: Any) -> str:
    return jwt.encode(user_claims(ISSUER, user, **claims), DEV_JWT_SECRET, algorithm="HS256")


def page_token(body: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


@dataclass
class Case:
    name: str
    # (world, user) -> the failing call; `user` is a fresh user unless `whose` names one of the world's.
    # (Any: the generated stubs are typed as if synchronous, though grpc.aio's calls are awaitable.)
    call: Callable[[World, str], Any]
    code: str
    reason: str
    fields: tuple[str, ...] = ()
    whose: str = ""


def good_prompt(**extra: Any) -> dict[str, Any]:
    return {"prompt": "a red bicycle", **extra}


CASES = [
    # -- authentication ---------------------------------------------------------------------------------
    Case(
        "no authorization metadata",
        lambda w, u: w.stub.CreateJob(pb.CreateJobRequest(prompt="x"), timeout=10),
        "UNAUTHENTICATED",
        "TOKEN_MISSING",
    ),
    Case(
        "Basic instead of Bearer",
        lambda w, u: create(w, (("authorization", "Basic dXNlcjpwYXNz"),), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_MISSING",
    ),
    Case(
        "Bearer without a token",
        lambda w, u: create(w, (("authorization", "Bearer "),), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_MISSING",
    ),
    Case(
        "malformed token",
        lambda w, u: create(w, bearer("not.a-jwt"), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "forged signature",
        lambda w, u: create(
            w, bearer(token_for(u).rsplit(".", 1)[0] + "." + token_for(new_user()).rsplit(".", 1)[1]), **good_prompt()
        ),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "expired",
        lambda w, u: create(
            w, bearer(token_for(u, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)), **good_prompt()
        ),
        "UNAUTHENTICATED",
        "TOKEN_EXPIRED",
    ),
    Case(
        "signed with another secret",
        lambda w, u: create(
            w, bearer(jwt.encode(user_claims(ISSUER, u), "someone-elses-secret-" * 3, "HS256")), **good_prompt()
        ),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "alg none",
        lambda w, u: create(
            w, bearer(hand_made({"alg": "none", "typ": "JWT"}, user_claims(ISSUER, u))), **good_prompt()
        ),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "HS256 signed with the RSA public key PEM",
        lambda w, u: create(w, bearer(hs256_signed_with_public_key(w.rsa, user_claims(ISSUER, u))), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "RS256 by a key the project never published",
        lambda w, u: create(w, bearer(SigningKey.rs256(w.rsa.kid).sign(user_claims(ISSUER, u))), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "audience anon",
        lambda w, u: create(w, bearer(token_for(u, aud="anon")), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "issuer of another project",
        lambda w, u: create(w, bearer(token_for(u, iss="https://other.supabase.co/auth/v1")), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "not valid before a future nbf",
        lambda w, u: create(w, bearer(token_for(u, nbf=int(time.time()) + 600)), **good_prompt()),
        "UNAUTHENTICATED",
        "TOKEN_INVALID",
    ),
    Case(
        "anonymous user (refused by the setting)",
        lambda w, u: create(w, bearer(token_for(u, is_anonymous=True)), **good_prompt()),
        "PERMISSION_DENIED",
        "ANONYMOUS_NOT_ALLOWED",
    ),
    # -- prompt and parameters ------------------------------------------------------------------------
    Case("empty prompt", lambda w, u: create_as(u, prompt="")(w), "INVALID_ARGUMENT", "INVALID_ARGUMENT", ("prompt",)),
    Case(
        "blank prompt",
        lambda w, u: create_as(u, prompt=" \n\t ")(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("prompt",),
    ),
    Case(
        "oversized prompt",
        lambda w, u: create_as(u, prompt="x" * 2001)(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("prompt",),
    ),
    Case(
        "NUL in the prompt",
        lambda w, u: create_as(u, prompt="a red\x00 bicycle")(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("prompt",),
    ),
    Case(
        "sample_count 5",
        lambda w, u: create_as(u, **good_prompt(params={"sample_count": 5}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.sample_count",),
    ),
    Case(
        "sample_count -1",
        lambda w, u: create_as(u, **good_prompt(params={"sample_count": -1}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.sample_count",),
    ),
    Case(
        "aspect_ratio 2:1",
        lambda w, u: create_as(u, **good_prompt(params={"aspect_ratio": "2:1"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.aspect_ratio",),
    ),
    Case(
        "image_size 4K",
        lambda w, u: create_as(u, **good_prompt(params={"image_size": "4K"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.image_size",),
    ),
    Case(
        "person_generation everyone",
        lambda w, u: create_as(u, **good_prompt(params={"person_generation": "everyone"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.person_generation",),
    ),
    Case(
        "output_mime_type image/gif",
        lambda w, u: create_as(u, **good_prompt(params={"output_mime_type": "image/gif"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.output_mime_type",),
    ),
    Case(
        "2K on a model without it",
        lambda w, u: create_as(u, **good_prompt(model="small", params={"image_size": "2K"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.image_size",),
    ),
    Case(
        "3 images on a model that makes at most 2",
        lambda w, u: create_as(u, **good_prompt(model="small", params={"sample_count": 3}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.sample_count",),
    ),
    Case(
        "4:3 on a model without it",
        lambda w, u: create_as(u, **good_prompt(model="small", params={"aspect_ratio": "4:3"}))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("params.aspect_ratio",),
    ),
    Case(
        "unknown model",
        lambda w, u: create_as(u, **good_prompt(model="dall-e-3"))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("model",),
    ),
    Case(
        "three bad fields at once, one violation each",
        lambda w, u: create_as(u, prompt="", params={"sample_count": 9, "aspect_ratio": "1:2"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("prompt", "params.sample_count", "params.aspect_ratio"),
    ),
    # -- templates -------------------------------------------------------------------------------------
    Case(
        "unknown template",
        lambda w, u: create_as(u, template_id="no-such-template", template_variables={"a": "b"})(w),
        "NOT_FOUND",
        "TEMPLATE_NOT_FOUND",
    ),
    Case(
        "inactive template",
        lambda w, u: create_as(u, template_id=w.retired_template, template_variables={"thing": "a cat"})(w),
        "FAILED_PRECONDITION",
        "TEMPLATE_INACTIVE",
    ),
    Case(
        "missing template variable",
        lambda w, u: create_as(u, template_id="product-shot", template_variables={"product": "a mug"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("template_variables[background]",),
    ),
    Case(
        "unknown template variable",
        lambda w, u: create_as(
            u, template_id="wallpaper", template_variables={"mood": "calm", "scene": "a lake", "colour": "red"}
        )(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("template_variables[colour]",),
    ),
    Case(
        "missing and unknown variables together",
        lambda w, u: create_as(u, template_id="avatar", template_variables={"styl": "flat"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("template_variables[style]", "template_variables[subject]", "template_variables[styl]"),
    ),
    Case(
        "prompt and template both",
        lambda w, u: create_as(u, prompt="mine", template_id="banner", template_variables={"scene": "a bay"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("prompt",),
    ),
    Case(
        "template variables without a template",
        lambda w, u: create_as(u, prompt="mine", template_variables={"scene": "a bay"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("template_variables",),
    ),
    Case(
        "NUL in a template id",
        lambda w, u: create_as(u, template_id="banner\x00", template_variables={"scene": "a bay"})(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("template_id",),
    ),
    # -- idempotency, limits, credits ------------------------------------------------------------------
    Case(
        "request_id with a space",
        lambda w, u: create_as(u, **good_prompt(request_id="order 1"))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("request_id",),
    ),
    Case(
        "request_id of 65 characters",
        lambda w, u: create_as(u, **good_prompt(request_id="r" * 65))(w),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("request_id",),
    ),
    Case(
        "request_id reused with a different request",
        lambda w, u: create_as(w.reuser, prompt="a different prompt", request_id="order-1")(w),
        "ALREADY_EXISTS",
        "REQUEST_ID_REUSED",
        whose="reuser",
    ),
    Case(
        "request_id reused with different parameters",
        lambda w, u: create_as(w.reuser, prompt="the original", request_id="order-1", params={"sample_count": 1})(w),
        "ALREADY_EXISTS",
        "REQUEST_ID_REUSED",
        whose="reuser",
    ),
    Case(
        "too many active jobs",
        lambda w, u: create_as(w.busy, **good_prompt(params={"sample_count": 1}))(w),
        "RESOURCE_EXHAUSTED",
        "TOO_MANY_ACTIVE_JOBS",
        whose="busy",
    ),
    Case(
        "more images than the balance pays for",
        lambda w, u: create_as(u, **good_prompt(model="pricey", params={"sample_count": 2}))(w),
        "RESOURCE_EXHAUSTED",
        "INSUFFICIENT_CREDITS",
    ),
    # -- acting for others ------------------------------------------------------------------------------
    Case(
        "a user setting user_id",
        lambda w, u: create_as(u, **good_prompt(user_id=w.owner))(w),
        "PERMISSION_DENIED",
        "SERVICE_ROLE_REQUIRED",
    ),
    Case(
        "a user calling GrantCredits",
        lambda w, u: w.stub.GrantCredits(
            pb.GrantCreditsRequest(user_id=u, amount=100), metadata=as_user(u), timeout=10
        ),
        "PERMISSION_DENIED",
        "SERVICE_ROLE_REQUIRED",
    ),
    Case(
        "a user listing another user's jobs",
        lambda w, u: w.stub.ListJobs(pb.ListJobsRequest(user_id=w.owner), metadata=as_user(u), timeout=10),
        "PERMISSION_DENIED",
        "SERVICE_ROLE_REQUIRED",
    ),
    Case(
        "service role creating a job without user_id",
        lambda w, u: create(w, as_service(), **good_prompt()),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("user_id",),
    ),
    Case(
        "service role with a malformed user_id",
        lambda w, u: create(w, as_service(), **good_prompt(user_id=u[:-1])),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("user_id",),
    ),
    Case(
        "service role balance without user_id",
        lambda w, u: w.stub.GetCreditBalance(pb.GetCreditBalanceRequest(), metadata=as_service(), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("user_id",),
    ),
    Case(
        "grant of 0 credits",
        lambda w, u: w.stub.GrantCredits(
            pb.GrantCreditsRequest(user_id=u, amount=0), metadata=as_service(), timeout=10
        ),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("amount",),
    ),
    Case(
        "grant of 2^62 credits",
        lambda w, u: w.stub.GrantCredits(
            pb.GrantCreditsRequest(user_id=u, amount=2**62), metadata=as_service(), timeout=10
        ),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("amount",),
    ),
    Case(
        "grant without user_id",
        lambda w, u: w.stub.GrantCredits(pb.GrantCreditsRequest(amount=5), metadata=as_service(), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("user_id",),
    ),
    # -- job ids ------------------------------------------------------------------------------------------
    Case(
        "GetJob with a malformed id",
        lambda w, u: w.stub.GetJob(pb.GetJobRequest(job_id="job-42"), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("job_id",),
    ),
    Case(
        "GetJob without an id",
        lambda w, u: w.stub.GetJob(pb.GetJobRequest(), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("job_id",),
    ),
    Case(
        "GetJob of a job that does not exist",
        lambda w, u: w.stub.GetJob(pb.GetJobRequest(job_id=str(uuid.uuid4())), metadata=as_user(u), timeout=10),
        "NOT_FOUND",
        "JOB_NOT_FOUND",
    ),
    Case(
        "GetJob of another user's job",
        lambda w, u: w.stub.GetJob(pb.GetJobRequest(job_id=w.owner_job), metadata=as_user(u), timeout=10),
        "NOT_FOUND",
        "JOB_NOT_FOUND",
    ),
    Case(
        "WatchJob with a malformed id",
        lambda w, u: first_message(w.stub.WatchJob(pb.WatchJobRequest(job_id="'; DROP TABLE"), metadata=as_user(u))),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("job_id",),
    ),
    Case(
        "CancelJob with a malformed id",
        lambda w, u: w.stub.CancelJob(pb.CancelJobRequest(job_id="12345"), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("job_id",),
    ),
    Case(
        "DeleteJob with a malformed id",
        lambda w, u: w.stub.DeleteJob(pb.DeleteJobRequest(job_id="../../etc"), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("job_id",),
    ),
    Case(
        "DeleteJob of another user's job",
        lambda w, u: w.stub.DeleteJob(pb.DeleteJobRequest(job_id=w.owner_job), metadata=as_user(u), timeout=10),
        "NOT_FOUND",
        "JOB_NOT_FOUND",
    ),
    Case(
        "CancelJob of a finished job",
        lambda w, u: w.stub.CancelJob(
            pb.CancelJobRequest(job_id=w.finished_job), metadata=as_user(w.owner), timeout=10
        ),
        "FAILED_PRECONDITION",
        "JOB_ALREADY_FINISHED",
        whose="owner",
    ),
    # -- listing ----------------------------------------------------------------------------------------
    Case(
        "page token that is not one",
        lambda w, u: w.stub.ListJobs(pb.ListJobsRequest(page_token="%%%garbage"), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_PAGE_TOKEN",
        ("page_token",),
    ),
    Case(
        "page token with fields of the wrong type",
        lambda w, u: w.stub.ListJobs(
            pb.ListJobsRequest(page_token=page_token({"t": 5, "id": 7, "u": u, "s": ""})),
            metadata=as_user(u),
            timeout=10,
        ),
        "INVALID_ARGUMENT",
        "INVALID_PAGE_TOKEN",
        ("page_token",),
    ),
    Case(
        "page token that is a JSON list",
        lambda w, u: w.stub.ListJobs(
            pb.ListJobsRequest(page_token=page_token([1, 2])), metadata=as_user(u), timeout=10
        ),
        "INVALID_ARGUMENT",
        "INVALID_PAGE_TOKEN",
        ("page_token",),
    ),
    Case(
        "page token with a timestamp without a zone",
        lambda w, u: w.stub.ListJobs(
            pb.ListJobsRequest(
                page_token=page_token({"t": "2026-01-01T00:00:00", "id": str(uuid.uuid4()), "u": u, "s": ""})
            ),
            metadata=as_user(u),
            timeout=10,
        ),
        "INVALID_ARGUMENT",
        "INVALID_PAGE_TOKEN",
        ("page_token",),
    ),
    Case(
        "negative page_size",
        lambda w, u: w.stub.ListJobs(pb.ListJobsRequest(page_size=-1), metadata=as_user(u), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("page_size",),
    ),
    Case(
        "unknown state filter",
        lambda w, u: w.stub.ListJobs(pb.ListJobsRequest(state=99), metadata=as_user(u), timeout=10),  # type: ignore[arg-type]
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("state",),
    ),
    Case(
        "service role listing without user_id",
        lambda w, u: w.stub.ListJobs(pb.ListJobsRequest(), metadata=as_service(), timeout=10),
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        ("user_id",),
    ),
]


@pytest.fixture(scope="module")
async def world(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    rsa = SigningKey.rs256()
    jwks = JwksServer([rsa]).start()
    job = {
        "supabase_url": jwks.url,
        "jwt_issuer": ISSUER,
        "allow_anonymous_users": False,
        "max_in_flight": 0,
        "active_jobs_per_user": ACTIVE_CAP,
        "max_prompt_chars": 2000,
        "model_prices": {"pricey": 60},
    }
    generator = {
        "models": [
            ModelSpec(id="local", provider="local", display_name="local", image_sizes=["1K", "2K"]),
            ModelSpec(
                id="small",
                provider="local",
                display_name="a small model",
                image_sizes=["1K"],
                aspect_ratios=["1:1", "16:9"],
                max_sample_count=2,
            ),
            ModelSpec(id="pricey", provider="local", display_name="a pricey model"),
        ]
    }
    retired = f"retired-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        "INSERT INTO templates (id, name, prompt_template, is_active) VALUES ($1, 'Retired', 'A {thing}', false)",
        retired,
    )
    await conn.close()
    try:
        async with running_services(database_url, tmp_path_factory.mktemp("bad"), job=job, generator=generator) as s:
            channel = grpc.aio.insecure_channel(s.target)
            stub = pb_grpc.JobServiceStub(channel)
            owner, busy, reuser = new_user(), new_user(), new_user()
            async with s.client(owner) as client:
                owner_job = (await client.create_job("owner's job", sample_count=1)).id
                finished = (await client.create_job("owner's other job", sample_count=1)).id
                await client.cancel_job(finished)
            async with s.client(busy) as client:
                for i in range(ACTIVE_CAP):
                    await client.create_job(f"busy {i}", sample_count=1)
            async with s.client(reuser) as client:
                await client.create_job("the original", sample_count=2, request_id="order-1")
            yield World(s, stub, jwks, rsa, owner, owner_job, finished, busy, reuser, retired)
            await channel.close()
    finally:
        jwks.stop()


async def row_counts(db: asyncpg.Connection, user: str) -> tuple[int, int, int]:
    return (
        await db.fetchval("SELECT count(*) FROM generation_jobs WHERE user_id = $1", user),
        await db.fetchval("SELECT count(*) FROM credit_ledger WHERE user_id = $1", user),
        await db.fetchval("SELECT count(*) FROM credit_accounts WHERE user_id = $1", user),
    )


def test_the_table_is_big_enough() -> None:
    assert len({case.name for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_request(case: Case, world: World, db: asyncpg.Connection) -> None:
    user = getattr(world, case.whose) if case.whose else new_user()
    before = await row_counts(db, user)

    failure = await failure_of(case.call(world, user))

    assert (failure.code, failure.reason) == (case.code, case.reason), failure.message
    assert failure.domains == [JOB_DOMAIN]
    assert failure.message, "a human-readable message too"
    assert sorted(failure.violations) == sorted(case.fields), failure.violations
    assert all(failure.violations.values()), "every violation says what is wrong"
    assert await row_counts(db, user) == before, "a refused request leaves nothing behind"

    # The server is fine: a good request right after works.
    async with world.services.client() as client:
        job = await client.create_job("a good request", sample_count=1)
        assert (await client.get_job(job.id)).id == job.id


async def test_the_ledger_is_consistent_after_all_of_it(world: World, db: asyncpg.Connection) -> None:
    await assert_credits_consistent(db)


async def test_another_users_job_is_not_found_for_get_watch_cancel_and_delete(world: World) -> None:
    stranger = as_user(new_user())
    unknown = str(uuid.uuid4())
    for job_id in (world.owner_job, unknown):
        request_get = pb.GetJobRequest(job_id=job_id)
        request_watch = pb.WatchJobRequest(job_id=job_id)
        request_cancel = pb.CancelJobRequest(job_id=job_id)
        request_delete = pb.DeleteJobRequest(job_id=job_id)
        answers = [
            await failure_of(world.stub.GetJob(request_get, metadata=stranger, timeout=10)),
            await failure_of(first_message(world.stub.WatchJob(request_watch, metadata=stranger, timeout=10))),
            await failure_of(world.stub.CancelJob(request_cancel, metadata=stranger, timeout=10)),
            await failure_of(world.stub.DeleteJob(request_delete, metadata=stranger, timeout=10)),
        ]
        # Exactly what a job that does not exist answers: nothing tells the stranger the job is there.
        assert [(a.code, a.reason, a.message.replace(job_id, "ID")) for a in answers] == [
            ("NOT_FOUND", "JOB_NOT_FOUND", "job ID not found")
        ] * 4

    async with world.services.client(world.owner) as client:
        still = await client.get_job(world.owner_job)
    assert still.state == pb.JOB_STATE_PENDING and not still.cancel_requested, "the stranger's cancel did nothing"
    assert still.id == world.owner_job, "nor the stranger's delete"
