"""Applies supabase/migrations/*.sql in name order, each once, recorded in `schema_migrations`.

The same files work with `supabase db push`; this runner is for every other database. Migrations
that need Supabase's own schemas guard themselves (they do nothing where the `auth` schema is
missing), so one ordered list serves every kind of database.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg

# Any number: it only has to be the same in every process that migrates.
_MIGRATION_LOCK_ID = 7_311_902_554


def default_migrations_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "supabase" / "migrations"


async def migrate(dsn: str, migrations_dir: Path | None = None) -> list[str]:
    """Applies what is not applied yet; returns the names applied now. Safe to run concurrently."""
    folder = migrations_dir or default_migrations_dir()
    files = sorted(folder.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no migrations in {folder}")
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["name"]: r["checksum"] for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")}
        for path in files:
            sql = path.read_text()
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != checksum:
                    raise RuntimeError(f"migration {path.name} changed after it was applied; add a new one instead")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", path.name, checksum
                )
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)
        await conn.close()
    return applied_now
