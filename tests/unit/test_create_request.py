"""CreateJob's pure step: a request, its template and the model catalogue in, a priced and hashed NewJob or every
field violation out. Plain function calls: no database, no gRPC, no event loop."""

from __future__ import annotations

import dataclasses

import pytest

from imagegen_common.errors import FieldViolation, ServiceError
from job_service.create_request import (
    CreateJobInput,
    NewJob,
    RequestRules,
    check_create_request,
)
from job_service.domain import InputRef, ModelInfo, Params, Template
from job_service.webhooks import WebhookPolicy

USER = "11111111-1111-1111-1111-111111111111"

CATALOG = {
    "local": ModelInfo(
        "local",
        aspect_ratios=["1:1", "4:3", "16:9"],
        image_sizes=["1K", "2K"],
        max_sample_count=4,
        person_generation_options=["dont_allow", "allow_adult", "allow_all"],
        parameters=["seed", "add_watermark", "negative_prompt", "jpeg_quality", "language", "safety_setting"],
        safety_settings=["block_low", "block_none"],
        languages=["en", "ja"],
    ),
    # Makes at most 2 images, has no person-generation control and takes no optional parameter.
    "small": ModelInfo("small", ["1:1", "16:9"], ["1K"], 2, []),
    # Could make 8 images; a job still makes at most 4.
    "big": ModelInfo("big", ["1:1", "21:9"], ["1K", "4K"], 8, ["allow_adult"]),
}
RULES = RequestRules(
    default_model="local",
    max_prompt_chars=100,
    default_price_per_image=2,
    model_prices={"big": 9},
    webhooks=WebhookPolicy(),
)
PRODUCT = Template(
    id="prod",
    name="Product",
    description="",
    prompt_template="A photo of {product} on {background}",
    variables=["product", "background"],
    model="",
    default_params={"aspect_ratio": "4:3", "sample_count": 2},
    price_per_image=None,
    is_active=True,
)
POSTER = Template(
    id="poster",
    name="Poster",
    description="",
    prompt_template="A {style} poster",
    variables=["style"],
    model="small",
    default_params={"sample_count": 1},
    price_per_image=3,
    is_active=True,
)
PRODUCT_VARIABLES = {"product": "a mug", "background": "white"}


def check(
    request: CreateJobInput,
    *,
    template: Template | None = None,
    catalog: dict[str, ModelInfo] | None = CATALOG,
    rules: RequestRules = RULES,
    inputs: tuple[InputRef, ...] = (),
    input_violations: tuple[FieldViolation, ...] = (),
) -> NewJob | list[FieldViolation]:
    return check_create_request(
        request,
        user_id=USER,
        template=template,
        catalog=catalog,
        rules=rules,
        inputs=inputs,
        input_violations=input_violations,
    )


def accepted(request: CreateJobInput, **context: object) -> NewJob:
    result = check(request, **context)  # type: ignore[arg-type]
    assert isinstance(result, NewJob), result
    return result


def refused(request: CreateJobInput, **context: object) -> dict[str, str]:
    """The violations, field -> description, in the order they are reported (each field once)."""
    result = check(request, **context)  # type: ignore[arg-type]
    assert isinstance(result, list), result
    assert len({v.field for v in result}) == len(result), result
    return {v.field: v.description for v in result}


def with_params(model: str = "", **params: object) -> CreateJobInput:
    """A request setting these params explicitly (as the servicer marks what the caller set)."""
    return CreateJobInput(
        prompt="a red bicycle",
        model=model,
        params=Params(**params),  # type: ignore[arg-type]
        params_set=frozenset(params),
    )


# -- a good request ---------------------------------------------------------------------------------------------


def test_a_plain_request_becomes_the_job_it_asks_for_on_the_default_model() -> None:
    job = accepted(CreateJobInput(prompt="a red bicycle", request_id="order-1", priority=7, start_within=60.0))

    assert (job.user_id, job.prompt, job.model, job.template_id, job.request_id) == (
        USER,
        "a red bicycle",
        "local",
        None,
        "order-1",
    )
    assert job.params == Params(sample_count=4, aspect_ratio="1:1", image_size="1K", person_generation="allow_adult")
    assert (job.price_per_image, job.webhook, job.priority, job.start_within) == (2, None, 7, 60.0)


def test_tabs_and_newlines_are_text_not_control_characters() -> None:
    assert accepted(CreateJobInput(prompt="line one\n\tline two\r\n")).prompt == "line one\n\tline two\r\n"


# -- prompt ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        ("", "required (or set template_id)"),
        (" \n\t ", "required (or set template_id)"),
        ("x" * 101, "the prompt may have at most 100 characters"),
        ("a red\x00 bicycle", "must not contain control characters"),
        ("a red\x1b bicycle", "must not contain control characters"),
    ],
)
def test_a_bad_prompt_is_refused(prompt: str, problem: str) -> None:
    assert refused(CreateJobInput(prompt=prompt)) == {"prompt": problem}


def test_a_prompt_of_exactly_the_limit_is_accepted() -> None:
    assert accepted(CreateJobInput(prompt="x" * 100)).prompt == "x" * 100


# -- names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "problem"),
    [("m" * 129, "at most 128 characters"), ("loc\x00al", "must not contain control characters")],
)
def test_a_bad_model_name_is_not_looked_up_and_the_params_meet_the_static_limits(model: str, problem: str) -> None:
    # 4K and 3:2 are outside every declared list of `local`, but some model takes them: only the name is wrong.
    assert refused(with_params(model, image_size="4K", aspect_ratio="3:2")) == {"model": problem}
    assert refused(with_params(model, sample_count=9)) == {
        "model": problem,
        "params.sample_count": "must be 1-4",
    }


def test_a_bad_template_id_is_reported_and_the_prompt_it_would_give_is_not_judged() -> None:
    request = CreateJobInput(template_id="banner\x00", template_variables={"scene": "a bay"})
    assert refused(request) == {"template_id": "must not contain control characters"}
    assert refused(CreateJobInput(template_id="t" * 129)) == {"template_id": "at most 128 characters"}


def test_an_unknown_model_names_the_ones_there_are() -> None:
    assert refused(CreateJobInput(prompt="a cat", model="dall-e-3")) == {
        "model": "unknown model 'dall-e-3'; one of: big, local, small"
    }


def test_without_the_catalogue_any_well_formed_model_passes_and_the_static_limits_apply() -> None:
    job = accepted(with_params("imagen-9", image_size="4K", aspect_ratio="21:9"), catalog=None)
    assert (job.model, job.params.image_size, job.params.aspect_ratio) == ("imagen-9", "4K", "21:9")
    assert refused(with_params(image_size="8K", aspect_ratio="2:1"), catalog=None) == {
        "params.aspect_ratio": "local supports 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9, 1:4, 4:1, 1:8, 8:1",
        "params.image_size": "local supports 512, 1K, 2K, 4K",
    }


def test_without_the_catalogue_the_smallest_size_a_model_offers_still_passes() -> None:
    # Gemini 3.1 Flash Image (and local) take 512: a generator down for a moment must not refuse it.
    job = accepted(with_params("gemini-3.1-flash-image", image_size="512"), catalog=None)
    assert job.params.image_size == "512"


# -- templates ------------------------------------------------------------------------------------------------


def test_a_template_renders_the_prompt_and_its_defaults_go_under_the_request_params() -> None:
    defaults_only = accepted(CreateJobInput(template_id="prod", template_variables=PRODUCT_VARIABLES), template=PRODUCT)
    overridden = accepted(
        CreateJobInput(
            template_id="prod",
            template_variables=PRODUCT_VARIABLES,
            params=Params(sample_count=1, aspect_ratio="16:9"),
            params_set=frozenset({"aspect_ratio"}),
        ),
        template=PRODUCT,
    )

    assert (defaults_only.prompt, defaults_only.template_id) == ("A photo of a mug on white", "prod")
    assert (defaults_only.params.aspect_ratio, defaults_only.params.sample_count) == ("4:3", 2)
    assert defaults_only.params.image_size == "1K", "the documented default under the template's"
    # Only what the caller set wins: its sample_count of 1 was not marked as set, so the template's 2 stays.
    assert (overridden.params.aspect_ratio, overridden.params.sample_count) == ("16:9", 2)


def test_the_template_brings_its_model_unless_the_request_names_one() -> None:
    request = CreateJobInput(template_id="poster", template_variables={"style": "flat"}, params_set=frozenset())
    assert accepted(request, template=POSTER).model == "small"
    assert accepted(dataclasses.replace(request, model="big"), template=POSTER).model == "big"


def test_a_template_param_counts_as_chosen_not_as_a_default_to_fit() -> None:
    # A template setting person_generation on `small`, which has no such control: refused, not quietly dropped ...
    people = dataclasses.replace(POSTER, default_params={"person_generation": "dont_allow"})
    assert refused(CreateJobInput(template_id="poster", template_variables={"style": "flat"}), template=people) == {
        "params.person_generation": "small does not take person_generation"
    }
    # ... and PRODUCT's sample_count of 2 stays 2 on a model that makes 4, rather than becoming "as many as it makes".
    assert accepted(
        CreateJobInput(template_id="prod", template_variables=PRODUCT_VARIABLES), template=PRODUCT
    ).params == (Params(sample_count=2, aspect_ratio="4:3"))


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"product": "a mug"}, {"template_variables[background]": "required by the template"}),
        (
            {**PRODUCT_VARIABLES, "colour": "red"},
            {"template_variables[colour]": "not a variable of this template (it has: product, background)"},
        ),
        (
            {"product": "a\x00mug", "background": "white"},
            {"template_variables[product]": "must not contain control characters"},
        ),
        (
            {"product": "x" * 90, "background": "white"},
            {"template_variables": "the prompt may have at most 100 characters"},
        ),
    ],
)
def test_bad_template_variables_are_refused_by_variable(variables: dict[str, str], expected: dict[str, str]) -> None:
    assert refused(CreateJobInput(template_id="prod", template_variables=variables), template=PRODUCT) == expected


def test_a_prompt_with_a_template_and_variables_without_one_are_refused() -> None:
    with_template = CreateJobInput(prompt="mine", template_id="prod", template_variables=PRODUCT_VARIABLES)
    assert refused(with_template, template=PRODUCT) == {"prompt": "must be empty when template_id is set"}
    assert refused(CreateJobInput(prompt="mine", template_variables={"scene": "a bay"})) == {
        "template_variables": "only allowed with template_id"
    }


# -- request_id, webhook, priority, start_within ---------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["order 1", "r" * 65, "order/1", "é"])
def test_a_request_id_outside_its_pattern_is_refused(request_id: str) -> None:
    assert refused(CreateJobInput(prompt="a cat", request_id=request_id)) == {
        "request_id": "1-64 characters of A-Z a-z 0-9 _ . : -"
    }


def test_a_request_id_of_every_allowed_character_is_kept() -> None:
    assert accepted(CreateJobInput(prompt="a cat", request_id="Aa0_.:-" + "r" * 57)).request_id == "Aa0_.:-" + "r" * 57


def test_a_webhook_keeps_its_distinct_events_sorted_or_gets_the_job_end_events() -> None:
    asked = CreateJobInput(
        prompt="a cat",
        webhook_url="https://example.com/hook",
        webhook_events=("job.started", "job.completed", "job.started"),
    )
    assert accepted(asked).webhook == {"url": "https://example.com/hook", "events": ["job.completed", "job.started"]}
    assert accepted(dataclasses.replace(asked, webhook_events=())).webhook == {
        "url": "https://example.com/hook",
        "events": ["job.cancelled", "job.completed", "job.expired", "job.failed"],
    }


@pytest.mark.parametrize(
    ("url", "events", "expected"),
    [
        ("http://example.com/hook", (), {"webhook_url": "must start with https://"}),
        ("https://10.0.0.1/hook", (), {"webhook_url": "10.0.0.1 is not a public address"}),
        ("https://example.com/hook", ("job.nope",), {"webhook_events": "unknown event 'job.nope'"}),
        ("https://example.com/hook", tuple(f"e{i}" for i in range(17)), {"webhook_events": "at most 16 distinct"}),
        ("", ("job.completed",), {"webhook_events": "only allowed with webhook_url"}),
    ],
)
def test_a_bad_webhook_is_refused(url: str, events: tuple[str, ...], expected: dict[str, str]) -> None:
    violations = refused(CreateJobInput(prompt="a cat", webhook_url=url, webhook_events=events))
    assert list(violations) == list(expected)
    assert all(violations[field].startswith(start) for field, start in expected.items()), violations


def test_a_webhook_where_webhooks_are_off_is_a_failed_precondition_not_a_field_to_fix() -> None:
    request = CreateJobInput(prompt="a cat", webhook_url="https://example.com/hook")
    with pytest.raises(ServiceError) as refusal:
        check(request, rules=dataclasses.replace(RULES, webhooks=None))
    assert (refusal.value.kind, refusal.value.reason) == ("FAILED_PRECONDITION", "WEBHOOKS_DISABLED")
    assert accepted(CreateJobInput(prompt="a cat"), rules=dataclasses.replace(RULES, webhooks=None)).webhook is None


@pytest.mark.parametrize(("priority", "ok"), [(-1, False), (0, True), (9, True), (10, False)])
def test_priority_is_0_to_9(priority: int, ok: bool) -> None:
    request = CreateJobInput(prompt="a cat", priority=priority)
    if ok:
        assert accepted(request).priority == priority
    else:
        assert refused(request) == {"priority": "must be 0-9"}


@pytest.mark.parametrize(
    ("seconds", "ok"), [(0.5, False), (1.0, True), (7 * 86_400.0, True), (7 * 86_400.0 + 1, False)]
)
def test_start_within_is_1_second_to_7_days(seconds: float, ok: bool) -> None:
    request = CreateJobInput(prompt="a cat", start_within=seconds)
    if ok:
        assert accepted(request).start_within == seconds
    else:
        assert refused(request) == {"start_within": "must be between 1 second and 7 days"}


# -- params against the model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "count"), [("local", 4), ("small", 2), ("big", 4)])
def test_an_unset_sample_count_is_as_many_as_the_model_makes_up_to_4(model: str, count: int) -> None:
    assert accepted(CreateJobInput(prompt="a cat", model=model)).params.sample_count == count


@pytest.mark.parametrize(
    ("model", "count", "problem"),
    [
        ("local", 5, "must be 1-4"),
        ("local", 0, "must be 1-4"),
        ("local", -1, "must be 1-4"),
        ("small", 3, "must be 1-2"),
    ],
)
def test_a_sample_count_outside_the_models_bounds_is_refused(model: str, count: int, problem: str) -> None:
    assert refused(with_params(model, sample_count=count)) == {"params.sample_count": problem}


def test_person_generation_defaults_to_the_models_own_behaviour_where_it_has_no_control() -> None:
    assert accepted(CreateJobInput(prompt="a cat", model="small")).params.person_generation == ""
    assert accepted(CreateJobInput(prompt="a cat", model="big")).params.person_generation == "allow_adult"
    assert refused(with_params("small", person_generation="dont_allow")) == {
        "params.person_generation": "small does not take person_generation"
    }
    assert refused(with_params(person_generation="everyone")) == {
        "params.person_generation": "must be one of dont_allow, allow_adult, allow_all"
    }


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        ("small", {"aspect_ratio": "4:3"}, {"params.aspect_ratio": "small supports 1:1, 16:9"}),
        ("local", {"aspect_ratio": "21:9"}, {"params.aspect_ratio": "local supports 1:1, 4:3, 16:9"}),
        ("small", {"image_size": "2K"}, {"params.image_size": "small supports 1K"}),
        ("big", {"image_size": "4K", "aspect_ratio": "21:9"}, {}),
        (
            "local",
            {"output_mime_type": "image/gif"},
            {"params.output_mime_type": "must be one of image/png, image/jpeg"},
        ),
    ],
)
def test_aspect_ratios_sizes_and_formats_are_the_models_own(
    model: str, params: dict[str, object], expected: dict[str, str]
) -> None:
    request = with_params(model, **params)
    if expected:
        assert refused(request) == expected
    else:
        assert accepted(request).params == Params(**params)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "params", "expected"),
    [
        (
            "small",
            {"seed": 3, "add_watermark": False},
            {"params.seed": "small does not take seed", "params.add_watermark": "small does not take add_watermark"},
        ),
        ("local", {"seed": 3}, {"params.seed": "needs add_watermark=false (a watermarked image takes no seed)"}),
        ("local", {"seed": 0, "add_watermark": False}, {"params.seed": "must be 1-2147483647"}),
        ("local", {"seed": 2**31, "add_watermark": False}, {"params.seed": "must be 1-2147483647"}),
        ("local", {"negative_prompt": "n" * 1001}, {"params.negative_prompt": "at most 1000 characters"}),
        ("local", {"negative_prompt": "no\x00dogs"}, {"params.negative_prompt": "must not contain control characters"}),
        ("local", {"safety_setting": "block_all"}, {"params.safety_setting": "must be one of block_low, block_none"}),
        ("local", {"language": "fr"}, {"params.language": "must be one of en, ja"}),
        ("local", {"jpeg_quality": 101, "output_mime_type": "image/jpeg"}, {"params.jpeg_quality": "must be 1-100"}),
        ("local", {"jpeg_quality": 80}, {"params.jpeg_quality": "only with output_mime_type image/jpeg"}),
        ("small", {"enhance_prompt": True}, {"params.enhance_prompt": "small does not take enhance_prompt"}),
    ],
)
def test_an_optional_param_the_model_cannot_honour_is_refused_naming_model_and_field(
    model: str, params: dict[str, object], expected: dict[str, str]
) -> None:
    assert refused(with_params(model, **params)) == expected


def test_optional_params_the_model_honours_are_kept() -> None:
    request = with_params(seed=42, add_watermark=False, output_mime_type="image/jpeg", jpeg_quality=70, language="en")
    assert accepted(request).params.as_dict() == {
        "sample_count": 4,
        "aspect_ratio": "1:1",
        "image_size": "1K",
        "person_generation": "allow_adult",
        "output_mime_type": "image/jpeg",
        "seed": 42,
        "add_watermark": False,
        "language": "en",
        "jpeg_quality": 70,
    }


def test_without_the_catalogue_the_generator_is_left_to_judge_safety_and_language() -> None:
    request = with_params(safety_setting="block_all", language="fr", seed=0)
    assert refused(request, catalog=None) == {"params.seed": "must be 1-2147483647"}


# -- everything at once ---------------------------------------------------------------------------------------------


def test_every_violation_is_reported_together_in_the_order_of_the_request() -> None:
    request = CreateJobInput(
        prompt="",
        model="m" * 200,
        params=Params(sample_count=9, aspect_ratio="1:2"),
        params_set=frozenset({"sample_count", "aspect_ratio"}),
        request_id="order 1",
        webhook_events=("job.completed",),
        priority=12,
        start_within=0.0,
    )
    input_problem = FieldViolation("input_images[0].data", "must be a PNG, JPEG or WebP image")

    assert list(refused(request, input_violations=(input_problem,))) == [
        "model",
        "prompt",
        "request_id",
        "webhook_events",
        "priority",
        "start_within",
        "params.sample_count",
        "params.aspect_ratio",
        "input_images[0].data",
    ]


def test_checked_input_images_go_into_the_params_in_order() -> None:
    inline = InputRef("image/png", 20, 10, 75, sha256="ab" * 32)
    earlier = InputRef("image/png", 64, 32, 123, job_id=USER, index=0, storage_path=f"{USER}/0.png")
    job = accepted(CreateJobInput(prompt="combine them"), inputs=(earlier, inline))
    assert job.params.input_images == (earlier, inline)
    assert job.params.parent == earlier


# -- price ----------------------------------------------------------------------------------------------------------


def test_the_price_is_the_templates_else_the_models_else_the_default() -> None:
    poster = CreateJobInput(template_id="poster", template_variables={"style": "flat"}, params_set=frozenset())
    free = dataclasses.replace(POSTER, price_per_image=0)
    assert accepted(poster, template=POSTER).price_per_image == 3
    assert accepted(poster, template=free).price_per_image == 0, "a free template is free, not unpriced"
    assert accepted(CreateJobInput(prompt="a cat", model="big")).price_per_image == 9
    assert accepted(CreateJobInput(prompt="a cat", model="small")).price_per_image == 2
    unpriced_template = CreateJobInput(template_id="prod", template_variables=PRODUCT_VARIABLES, model="big")
    assert accepted(unpriced_template, template=dataclasses.replace(PRODUCT, default_params={})).price_per_image == 9


# -- the idempotency hash -----------------------------------------------------------------------------------------

# Computed by CreateJob on main before the pure step existed (commit 1226fa8): a job stored then must match a
# replay of its request now, or a client's retry across the upgrade would be refused as REQUEST_ID_REUSED.
HASH_PLAIN = "ab19b6fd6462cbd77d8a8cc9deda5e1c39ed7883e6ea3f4c329549acde3cce6c"
HASH_EVERY_ADDITION = "9ad5e623d3490f8649e85b53b713887a5c47ef46a8fbfb8ca46cd392863a3298"
HASH_TEMPLATE = "fe65e8702ba996ab179c80df6214ffc996db1a8651de2d5050a3f58eeeae8c17"

EVERY_ADDITION = CreateJobInput(
    prompt="a red bicycle",
    model="local",
    params=Params(sample_count=2, aspect_ratio="16:9", seed=42, add_watermark=False),
    params_set=frozenset({"sample_count", "aspect_ratio", "seed", "add_watermark"}),
    webhook_url="https://example.com/hook",
    webhook_events=("job.completed", "job.started"),
    priority=7,
    start_within=60.0,
)


def test_the_hash_is_what_it_was_before_the_pure_step() -> None:
    assert accepted(CreateJobInput(prompt="a red bicycle")).request_hash == HASH_PLAIN
    assert accepted(EVERY_ADDITION).request_hash == HASH_EVERY_ADDITION
    templated = CreateJobInput(template_id="prod", template_variables=PRODUCT_VARIABLES)
    assert accepted(templated, template=PRODUCT).request_hash == HASH_TEMPLATE


def test_fields_added_later_leave_the_hash_of_a_request_without_them_unchanged() -> None:
    # Neither a request_id (the key itself) nor unset later additions (webhook, priority, start_within) enter it.
    assert accepted(CreateJobInput(prompt="a red bicycle", request_id="order-1")).request_hash == HASH_PLAIN


def test_the_same_request_has_the_same_hash_and_any_change_another() -> None:
    assert accepted(EVERY_ADDITION).request_hash == accepted(dataclasses.replace(EVERY_ADDITION)).request_hash
    changes = [
        {"prompt": "a blue bicycle"},
        {
            "model": "big",
            "params": Params(sample_count=2, aspect_ratio="1:1"),
            "params_set": frozenset({"sample_count"}),
        },
        {"webhook_url": "https://example.com/other"},
        {"webhook_events": ("job.completed",)},
        {"priority": 6},
        {"start_within": 61.0},
        {"priority": None, "start_within": None},
    ]
    hashes = {accepted(dataclasses.replace(EVERY_ADDITION, **change)).request_hash for change in changes}  # type: ignore[arg-type]
    assert len(hashes) == len(changes) and HASH_EVERY_ADDITION not in hashes
