"""Templates end to end: ListTemplates, and CreateJob from a template (rendered prompt, template defaults under
the request's params, the template's model), plus how unset params are filled in."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from imagegen.job.v1 import job_service_pb2 as pb
from imagegen.job.v1 import job_service_pb2_grpc as pb_grpc

from generator_service.config import ModelSpec
from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from tests.support.rpc_errors import RpcFailure, failure_of
from tests.support.services import Services, new_user, running_services


def as_user(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(DEV_JWT_SECRET, user_id=user)}"),)


@pytest.fixture(scope="module")
async def services(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Services]:
    generator = {
        "models": [
            ModelSpec(id="local", provider="local", display_name="local", image_sizes=["1K", "2K"]),
            ModelSpec(id="small", provider="local", display_name="small", max_sample_count=2),
            # Honours Imagen's parameters, as Vertex Imagen does (the catalogue's `parameters`).
            ModelSpec(
                id="seeded",
                provider="local",
                display_name="seeded",
                parameters=["seed", "add_watermark", "enhance_prompt"],
            ),
        ]
    }
    job = {"max_in_flight": 0, "active_jobs_per_user": 100}
    async with running_services(database_url, tmp_path_factory.mktemp("tpl"), job=job, generator=generator) as s:
        yield s


@pytest.fixture(scope="module")
async def custom_templates(database_url: str) -> AsyncIterator[tuple[str, str]]:
    """An active template with its own model and defaults, and an inactive one."""
    active, inactive = f"poster-{uuid.uuid4().hex[:6]}", f"old-{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        """INSERT INTO templates (id, name, description, prompt_template, model, default_params, price_per_image,
                                  is_active)
           VALUES ($1, 'Poster', 'A poster', 'A {style} poster of {subject}, {style} colours', 'small',
                   '{"image_size": "1K", "aspect_ratio": "3:4", "sample_count": "2", "bogus": 1}', 3, true),
                  ($2, 'Old', '', 'An old {thing}', '', '{}', NULL, false)""",
        active,
        inactive,
    )
    await conn.close()
    yield active, inactive


async def test_list_templates_shows_the_active_ones_with_their_variables(
    services: Services, custom_templates: tuple[str, str]
) -> None:
    active, inactive = custom_templates
    async with services.client() as client:
        templates = {t.id: t for t in await client.list_templates()}

    assert {"product-shot", "avatar", "wallpaper", "banner", active} <= set(templates)
    assert inactive not in templates
    product = templates["product-shot"]
    assert list(product.variables) == ["product", "background"]
    assert "{product}" in product.prompt_template
    assert (product.default_params.aspect_ratio, product.default_params.sample_count) == ("1:1", 4)
    assert templates["banner"].price_per_image == 2
    poster = templates[active]
    assert list(poster.variables) == ["style", "subject"]
    assert (poster.model, poster.price_per_image) == ("small", 3)


async def test_create_from_a_template_renders_the_prompt_and_merges_defaults_under_the_request(
    services: Services,
) -> None:
    async with services.client() as client:
        defaults_only = await client.create_job(
            template_id="product-shot", template_variables={"product": "a ceramic mug", "background": "white"}
        )
        overridden = await client.create_job(
            template_id="product-shot",
            template_variables={"product": "a ceramic mug", "background": "white"},
            sample_count=2,
            aspect_ratio="16:9",
        )

    assert defaults_only.prompt == (
        "A professional studio photograph of a ceramic mug on a white background, soft lighting, high detail"
    )
    assert defaults_only.template_id == "product-shot"
    # Template defaults (1:1, 4 images) over the documented defaults (1K, allow_adult, image/png).
    assert (defaults_only.params.sample_count, defaults_only.params.aspect_ratio) == (4, "1:1")
    assert (defaults_only.params.image_size, defaults_only.params.person_generation) == ("1K", "allow_adult")
    assert defaults_only.params.output_mime_type == "image/png"
    # The request's own params win over the template's.
    assert (overridden.params.sample_count, overridden.params.aspect_ratio) == (2, "16:9")
    assert overridden.prompt == defaults_only.prompt


async def test_a_template_brings_its_model_and_price(services: Services, custom_templates: tuple[str, str]) -> None:
    active, _ = custom_templates
    async with services.client() as client:
        job = await client.create_job(
            template_id=active, template_variables={"style": "retro", "subject": "a rocket"}, sample_count=1
        )
        on_other_model = await client.create_job(
            template_id=active, template_variables={"style": "retro", "subject": "a rocket"}, model="local"
        )

    assert job.prompt == "A retro poster of a rocket, retro colours"
    assert job.model == "small"
    assert job.params.aspect_ratio == "3:4"
    assert job.credits_reserved == 3, "the template's price per image"
    assert on_other_model.model == "local"
    # The template's sample_count is a string in the table: ignored, so the model's maximum applies.
    assert on_other_model.params.sample_count == 4


async def test_unset_params_take_the_documented_defaults_fitted_to_the_model(services: Services) -> None:
    async with services.client() as client:
        plain = await client.create_job("a plain job")
        small = await client.create_job("on a model that makes at most 2", model="small")
        big = await client.create_job("2K where the model has it", image_size="2K", person_generation="dont_allow")

    assert (plain.model, plain.params.sample_count, plain.params.aspect_ratio) == ("local", 4, "1:1")
    assert (plain.params.image_size, plain.params.person_generation) == ("1K", "allow_adult")
    assert small.params.sample_count == 2 and small.credits_reserved == 2
    assert (big.params.image_size, big.params.person_generation) == ("2K", "dont_allow")


async def test_request_ids_are_per_user(services: Services) -> None:
    first, second = new_user(), new_user()
    async with services.client(first) as a, services.client(second) as b:
        job_a = await a.create_job("same key, two users", sample_count=1, request_id="checkout-1")
        job_b = await b.create_job("same key, two users", sample_count=1, request_id="checkout-1")
        again_a = await a.create_job("same key, two users", sample_count=1, request_id="checkout-1")

    assert job_a.id != job_b.id
    assert again_a.id == job_a.id
    assert job_b.state == pb.JOB_STATE_PENDING


async def create_through_a_default_client(services: Services, request: pb.CreateJobRequest) -> RpcFailure:
    """CreateJob through a channel with gRPC's default options (8 KiB of metadata, trailers included)."""
    async with grpc.aio.insecure_channel(services.target) as channel:
        stub = pb_grpc.JobServiceStub(channel)
        return await failure_of(stub.CreateJob(request, metadata=as_user(new_user()), timeout=10))


async def test_fifty_unknown_template_variables_are_reported_in_bounded_details(services: Services) -> None:
    variables = {"style": "flat", "subject": "a fox", **{f"extra_{i}": "x" for i in range(50)}}
    failure = await create_through_a_default_client(
        services, pb.CreateJobRequest(template_id="avatar", template_variables=variables)
    )
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert len(failure.violations) <= 11 and len(failure.message) <= 600
    shown = [field for field in failure.violations if field.startswith("template_variables[extra_")]
    assert shown and all("not a variable of this template" in failure.violations[f] for f in shown)
    assert f"{50 - len(shown)} more field violations not shown" in failure.violations[""]


async def test_a_five_kilobyte_variable_name_is_cut_in_the_details_with_a_marker(services: Services) -> None:
    name = "n" * 5_000
    failure = await create_through_a_default_client(
        services,
        pb.CreateJobRequest(template_id="avatar", template_variables={"style": "flat", "subject": "a", name: "x"}),
    )
    assert (failure.code, failure.reason) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    [field] = failure.violations
    assert field.startswith("template_variables[nnnn") and "characters cut]" in field and len(field) <= 100
    assert len(failure.message) <= 600 and "characters cut]" in failure.message


async def test_an_over_long_model_and_a_bad_sample_count_are_reported_together(services: Services) -> None:
    failure = await create_through_a_default_client(
        services,
        pb.CreateJobRequest(prompt="a fox", model="m" * 200, params=pb.GenerationParams(sample_count=9)),
    )
    assert failure.code == "INVALID_ARGUMENT"
    assert sorted(failure.violations) == ["model", "params.sample_count"]
    assert failure.violations["model"] == "at most 128 characters"


async def test_a_template_defaults_seed_watermark_and_prompt_enhancement_under_the_request(
    services: Services, database_url: str
) -> None:
    template = f"seeded-{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        """INSERT INTO templates (id, name, description, prompt_template, model, default_params, is_active)
           VALUES ($1, 'Seeded', '', 'A {thing}', 'seeded',
                   '{"seed": 42, "add_watermark": false, "enhance_prompt": true, "sample_count": 1}', true)""",
        template,
    )
    await conn.close()
    async with services.client() as client:
        listed = {t.id: t for t in await client.list_templates()}[template].default_params
        from_defaults = await client.create_job(template_id=template, template_variables={"thing": "fox"})
        overridden = await client.create_job(
            template_id=template,
            template_variables={"thing": "fox"},
            params=pb.GenerationParams(seed=7, enhance_prompt=False),
        )

    assert (listed.seed, listed.add_watermark, listed.enhance_prompt) == (42, False, True)
    assert from_defaults.params.HasField("add_watermark") and from_defaults.params.HasField("enhance_prompt")
    params = from_defaults.params
    assert (params.seed, params.add_watermark, params.enhance_prompt) == (42, False, True)
    assert (overridden.params.seed, overridden.params.add_watermark, overridden.params.enhance_prompt) == (
        7,
        False,
        False,
    )
