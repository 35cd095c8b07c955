"""The README stays true: every setting is in its tables, and its benchmark table is the latest run."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from generator_service.config import GeneratorSettings
from job_service.config import JobSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def environment_names(cls: type[BaseSettings]) -> list[str]:
    names = []
    for name, field in cls.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            names.append(str(field.validation_alias.choices[0]))
        else:
            names.append(f"{cls.model_config.get('env_prefix', '')}{name}".upper())
    return names


def test_readme_names_every_setting() -> None:
    text = README.read_text()
    missing = [
        name for cls in (JobSettings, GeneratorSettings) for name in environment_names(cls) if f"`{name}`" not in text
    ]
    assert not missing, f"README.md's settings tables lack {missing}"


def test_readme_benchmark_table_is_the_latest_results() -> None:
    text = README.read_text()
    copied = text.split("<!-- bench:start -->\n", 1)[1].split("\n<!-- bench:end -->", 1)[0]
    latest = (README.parent / "bench" / "results" / "latest.md").read_text().strip()
    assert copied == latest, "README.md's benchmark table differs from bench/results/latest.md; copy it over"
