"""Prompt templates: `{placeholder}` variables, rendered with the caller's values."""

from __future__ import annotations

import re
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


def usable_defaults(template_id: str, default_params: Any) -> dict[str, object]:
    """The template's default params that are generation params of the right type.

    The templates table is edited by hand; a misspelt key or a "2" where 2 belongs must not break
    ListTemplates or CreateJob for everyone, so such entries are dropped (and logged) here.
    """
    if not isinstance(default_params, Mapping):
        log.warning("ignoring template default params that are not an object", template_id=template_id)
        return {}
    reference = Params()
    usable: dict[str, object] = {}
    for name, value in default_params.items():
        expected = type(getattr(reference, name)) if name in Params.__dataclass_fields__ else None
        if expected is not None and isinstance(value, expected) and not isinstance(value, bool):
            usable[name] = value
        else:
            log.warning("ignoring a template default param", template_id=template_id, param=name, value=repr(value))
    return usable
