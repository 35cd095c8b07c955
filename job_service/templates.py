"""Prompt templates: `{placeholder}` variables, rendered with the caller's values."""

from __future__ import annotations

import re
from collections.abc import Mapping

from imagegen_common.errors import FieldViolation

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
