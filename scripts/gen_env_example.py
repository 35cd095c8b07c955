"""Prints .env.example: every JobSettings and GeneratorSettings variable with its default and its comment.

The comments are the ones above each field in job_service/config.py and generator_service/config.py, so the
example stays in step with the code: `python scripts/gen_env_example.py > .env.example`. A test checks that
.env.example names every setting.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from generator_service.config import GeneratorSettings  # noqa: E402
from job_service.config import JobSettings  # noqa: E402

HEADER = """\
# imagegen configuration: copy to .env and uncomment what you change. Every setting of both services is listed
# with its default. Both services read .env from their working directory; docker compose reads it too (for the
# containers, and for ${...} in docker-compose.yml). Environment variables win over .env.
#
# docker-compose.yml sets a few of these itself (hosts, ports, DATABASE_URL, the generator target, plaintext on
# its private network, JSON logs, metrics, drain times); its `environment:` entries win over this file. Values it
# takes from here: SUPABASE_JWT_SECRET and GEN_AUTH_TOKEN (both required: `docker compose` refuses to start
# without them), POSTGRES_PASSWORD, GEN_STORAGE_PUBLIC_BASE_URL, and the IMAGEGEN_* lines below.
#
# Secrets (tokens, keys, passwords) belong in .env, never in the compose file or the image. Leave a line commented
# to keep its default: an empty value is not "unset" for every setting (an empty path is not "no file").

# --- docker compose only ---
# Required, no default: a random token for the JobService -> generator hop (openssl rand -hex 32).
# GEN_AUTH_TOKEN=
# POSTGRES_PASSWORD=imagegen
# The host address the published ports listen on (0.0.0.0: every interface; put TLS in front, docs/deploy.md).
# IMAGEGEN_BIND=127.0.0.1
# IMAGEGEN_JOB_PORT=50051
# IMAGEGEN_IMAGES_PORT=8088
# IMAGEGEN_METRICS_PORT=9101
# The Python base image of the build (a stand-in where no registry is reachable, docs/deploy.md).
# PYTHON_IMAGE=python:3.11-slim-bookworm
# SUPABASE_JWT_SECRET is required too (no default in compose): see JobService below.
"""


def env_names(cls: type[BaseSettings], name: str, field: Any) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    prefix = str(cls.model_config.get("env_prefix", ""))
    return [f"{prefix}{name}".upper()]


def render_default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list) and value and hasattr(value[0], "model_dump"):
            return "(the built-in model list; see docs/generator.md)"
        return json.dumps(value)
    value = field.default
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return str(value)


def comments(source: Path) -> dict[str, list[str]]:
    """The comment lines right above each `    name: type = ...` field, and an inline comment after it."""
    found: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in source.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^    ([a-z_][a-z0-9_]*): [^=]+(=.*)?$", line)
        if match:
            inline = line.split("  # ", 1)[1].strip() if "  # " in line else None
            found[match.group(1)] = pending + ([inline] if inline else [])
        pending = []
    return found


def section(title: str, cls: type[BaseSettings], source: Path) -> list[str]:
    notes = comments(source)
    out = ["", f"# --- {title} ---"]
    for name, field in cls.model_fields.items():
        names = env_names(cls, name, field)
        out.extend(f"# {line}" for line in notes.get(name, []))
        if len(names) > 1:
            out.append(f"# (also read as {', '.join(names[1:])})")
        out.append(f"# {names[0]}={render_default(field)}")
    return out


def main() -> None:
    lines = [HEADER.rstrip("\n")]
    lines += section("JobService (python -m job_service)", JobSettings, ROOT / "job_service" / "config.py")
    lines += section(
        "GeneratorService (python -m generator_service)", GeneratorSettings, ROOT / "generator_service" / "config.py"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
