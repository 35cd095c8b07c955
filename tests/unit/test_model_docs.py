"""The README's model table, its CLI examples and docs/generator.md's catalogue table match the catalogue
(generator_service/config.py), so a model added, renamed or resized there cannot be left out of the docs."""

from __future__ import annotations

import re
from pathlib import Path

from generator_service.config import _default_models

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = {m.id: m for m in _default_models()}


def generator_table() -> dict[str, list[str]]:
    """docs/generator.md's catalogue table: model id -> its sizes column."""
    rows: dict[str, list[str]] = {}
    text = (ROOT / "docs" / "generator.md").read_text()
    table = text[text.index("| Model id (ours)") : text.index("Aspect ratios: (I)")]
    for line in table.splitlines():
        match = re.match(r"\| `([^`]+)`[^|]*\|[^|]+\|([^|]+)\|", line)
        if match:
            rows[match[1]] = [size.strip() for size in match[2].split(",")]
    return rows


def test_docs_generator_lists_every_model_with_its_sizes() -> None:
    table = generator_table()
    assert set(table) == set(CATALOGUE)
    assert table == {i: m.image_sizes for i, m in CATALOGUE.items()}


def test_readme_names_every_model_and_its_examples_use_catalogued_models() -> None:
    readme = (ROOT / "README.md").read_text()
    models_section = readme[readme.index("## Models") : readme.index("## Settings")]
    named = set(re.findall(r"`([a-z0-9./-]+)`", models_section))
    # The Gemini API Imagen ids are named by one pattern row.
    missing = {i for i in CATALOGUE if i not in named and not i.startswith("gemini-api/imagen-4.0-")}
    assert not missing
    examples = re.findall(r"imagegen \S+ .*--model (\S+)", readme)
    assert examples and set(examples) <= set(CATALOGUE)
