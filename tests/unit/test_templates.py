"""Prompt templates: `{placeholder}` variables in order, rendered once, one violation per bad variable."""

from __future__ import annotations

from imagegen_common.errors import FieldViolation
from job_service.templates import placeholders, render, usable_defaults

PRODUCT = "A professional studio photograph of {product} on a {background} background, soft lighting"


def fields(violations: list[FieldViolation]) -> list[str]:
    return [v.field for v in violations]


def test_placeholders_in_order_of_first_appearance_without_repeats() -> None:
    assert placeholders("{b} and {a} and {b} again, {not a var} {_x1}") == ["b", "a", "_x1"]
    assert placeholders("no variables") == []


def test_render_fills_every_placeholder() -> None:
    prompt, violations = render(PRODUCT, {"product": "a ceramic mug", "background": "white"})
    assert violations == []
    assert prompt == "A professional studio photograph of a ceramic mug on a white background, soft lighting"


def test_values_are_trimmed_and_inserted_literally_never_re_expanded() -> None:
    prompt, violations = render(PRODUCT, {"product": "  a {background} sign ", "background": "red"})
    assert violations == []
    assert prompt.startswith("A professional studio photograph of a {background} sign on a red background")


def test_a_repeated_placeholder_takes_the_same_value() -> None:
    prompt, _ = render("{x} meets {x}", {"x": "a cat"})
    assert prompt == "a cat meets a cat"


def test_each_missing_variable_is_one_violation() -> None:
    _, violations = render(PRODUCT, {})
    assert fields(violations) == ["template_variables[product]", "template_variables[background]"]
    assert all("required" in v.description for v in violations)


def test_blank_values_count_as_missing() -> None:
    _, violations = render(PRODUCT, {"product": "   ", "background": "white"})
    assert fields(violations) == ["template_variables[product]"]


def test_each_unknown_variable_is_one_violation_naming_the_real_ones() -> None:
    _, violations = render(PRODUCT, {"product": "a mug", "background": "white", "colour": "red", "size": "big"})
    assert fields(violations) == ["template_variables[colour]", "template_variables[size]"]
    assert "product, background" in violations[0].description


def test_missing_and_unknown_together() -> None:
    _, violations = render(PRODUCT, {"prodcut": "a mug"})
    assert fields(violations) == [
        "template_variables[product]",
        "template_variables[background]",
        "template_variables[prodcut]",
    ]


def test_only_well_typed_generation_params_are_template_defaults() -> None:
    stored = {"sample_count": 2, "aspect_ratio": "9:16", "image_size": 2, "seed": "7", "person_generation": True}
    assert usable_defaults("t", stored) == {"sample_count": 2, "aspect_ratio": "9:16"}
    assert usable_defaults("t", {"sample_count": "2"}) == {}
    assert usable_defaults("t", ["not", "an", "object"]) == {}


def test_imagen_parameters_are_template_defaults_of_their_own_type() -> None:
    stored = {"seed": 42, "add_watermark": False, "enhance_prompt": True, "jpeg_quality": 80, "language": "ja"}
    assert usable_defaults("t", stored) == stored
    # A bool is no seed and a number no watermark choice; a template names no input images; null means unset.
    wrong = {"seed": True, "add_watermark": 0, "input_images": [], "enhance_prompt": None}
    assert usable_defaults("t", wrong) == {}
