"""supabase/schema.sql is what the migrations build: rebuilt and compared on every test run, as gen/ is for protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gen_schema() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schema", ROOT / "scripts" / "gen_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_schema_file_is_what_the_migrations_build(pg_server: str) -> None:
    gen_schema = _gen_schema()
    fresh = await gen_schema.generate(pg_server)
    difference = gen_schema.drift(fresh, (ROOT / "supabase" / "schema.sql").read_text())
    if difference:
        pytest.fail(
            "supabase/schema.sql is out of date with supabase/migrations/; run `make schema`:\n" + "".join(difference)
        )
