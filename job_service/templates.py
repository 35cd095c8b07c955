"""Prompt templates: `{placeholder}` variables, rendered with the caller's values."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import structlog

from imagegen_common.errors import FieldViolation
from job_service.domain import Params

log = structlog.get_logger(__name__)

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def placeholders(prompt_template: str) -> list[str]:
    """The variable names in order of first appearance."""
    return list(dict.fromkeys(_PLACEHOLDER.findall(prompt_template)))


def render(prompt_template: str, variables: Mapping[str, str]) -> tuple[str, list[FieldViolation]]:
    """The rendered prompt, and one violation per missing, empty or unknown variable."""
    needed = placeholders(prompt_template)
    violations = [
        FieldViolation(f"template_variables[{name}]", "required by the template")
        for name in needed
        if not variables.get(name, "").strip()
    ]
    violations += [
        FieldViolation(f"template_variables[{name}]", f"not a variable of this template (it has: {', '.join(needed)})")
        for name in variables
        if name not in needed
    ]
    # A single pass, so a value that itself contains "{x}" is inserted literally, never re-expanded.
    prompt = _PLACEHOLDER.sub(lambda m: variables.get(m.group(1), m.group(0)).strip(), prompt_template)
    return prompt, violations


def _default_types() -> dict[str, tuple[type, ...]]:
    """Each generation param a template may default, with the JSON types its value may have: from Params' own
    annotations, so a param added there (seed, add_watermark, enhance_prompt...) is a template default too.
    input_images is not: a template names no images."""
    allowed: dict[str, tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(Params).items():
        if name == "input_images":
            continue
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed[name] = tuple(t for t in options if t is not type(None))
    return allowed


_DEFAULT_TYPES = _default_types()


def _well_typed(value: object, allowed: tuple[type, ...]) -> bool:
    # JSON true is a bool, and a bool is an int in Python: only a bool param takes one, and only it.
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed) and bool not in allowed


def usable_defaults(template_id: str, default_params: Any) -> dict[str, object]:
    """The template's default params that are generation params of the right type.

    The templates table is edited by hand; a misspelt key or a "2" where 2 belongs must not break
    ListTemplates or CreateJob for everyone, so such entries are dropped (and logged) here. A null is "unset".
    """
    if not isinstance(default_params, Mapping):
        log.warning("ignoring template default params that are not an object", template_id=template_id)
        return {}
    usable: dict[str, object] = {}
    for name, value in default_params.items():
        allowed = _DEFAULT_TYPES.get(name)
        if allowed is not None and _well_typed(value, allowed):
            usable[name] = value
        elif value is not None or allowed is None:
            log.warning("ignoring a template default param", template_id=template_id, param=name, value=repr(value))
    return usable
