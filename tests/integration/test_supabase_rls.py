"""The Supabase-only migration: RLS, grants, foreign keys to auth.users and Realtime, on a Supabase-shaped database.

A fresh database gets what a Supabase project has before our migrations run (the roles anon, authenticated and
service_role, an `auth` schema with auth.users and auth.uid() reading request.jwt.claims as Supabase defines it,
and the supabase_realtime publication); then our own migrate runs, exactly as it does against a real project.
App clients are played the way PostgREST and Realtime do it: SET ROLE plus request.jwt.claims in a transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from imagegen.job.v1 import job_service_pb2 as pb

from imagegen_common.dev_tokens import DEV_JWT_SECRET, mint_token
from imagegen_common.migrate import migrate
from tests.support.database import create_database, drop_database
from tests.support.ledger import assert_credits_consistent
from tests.support.services import running_services

MIGRATION = "20261128000030_supabase_integration.sql"
OUR_TABLES = ("generation_jobs", "job_events", "credit_accounts", "credit_ledger", "templates")

# What a Supabase project has before any migration of ours: the API roles (cluster-wide, so made only when
# missing; other test sessions on the same server may be making them at the same moment), auth.users, and
# auth.uid() as Supabase defines it.
SUPABASE_BASE = """
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
END
$$;
ALTER ROLE service_role BYPASSRLS;
CREATE SCHEMA auth;
CREATE TABLE auth.users (id uuid PRIMARY KEY, email text);
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
-- Supabase grants the API roles everything on whatever is created in public; the migration has to undo it.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
CREATE PUBLICATION supabase_realtime;
"""


@pytest.fixture(scope="module")
async def supabase_url(pg_server: str) -> AsyncIterator[str]:
    url = await create_database(pg_server)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SUPABASE_BASE)
    finally:
        await conn.close()
    applied = await migrate(url)
    assert MIGRATION in applied
    yield url
    await drop_database(pg_server, url)


@pytest.fixture
async def admin(supabase_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(supabase_url)
    yield conn
    await conn.close()


async def new_auth_user(conn: asyncpg.Connection) -> str:
    user = str(uuid.uuid4())
    await conn.execute("INSERT INTO auth.users (id, email) VALUES ($1, $2)", user, f"{user}@example.com")
    return user


async def create_job(conn: asyncpg.Connection, user: str, prompt: str) -> str:
    """A job made the way JobService makes one (reservation, ledger row and first event included)."""
    row = await conn.fetchrow(
        """SELECT id FROM imagegen_create_job(
               p_user => $1, p_prompt => $2, p_model => 'local', p_params => '{"sample_count": 1}'::jsonb,
               p_template_id => NULL, p_request_id => NULL, p_request_hash => NULL, p_price => 1,
               p_sample_count => 1, p_max_attempts => 3, p_active_limit => 10, p_new_user_credits => 10)""",
        user,
        prompt,
    )
    assert row is not None
    return str(row["id"])


@asynccontextmanager
async def as_role(conn: asyncpg.Connection, role: str, user: str | None = None) -> AsyncIterator[None]:
    """What PostgREST does for each request: a transaction, SET LOCAL ROLE, the JWT's claims as a setting."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {role}")
        claims = {"role": role, **({"sub": user, "aud": "authenticated"} if user else {})}
        await conn.execute("SELECT set_config('request.jwt.claims', $1, true)", json.dumps(claims))
        yield


async def refused(conn: asyncpg.Connection, role: str, user: str | None, sql: str, *args: object) -> bool:
    try:
        async with as_role(conn, role, user):
            await conn.execute(sql, *args)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


async def test_a_user_reads_only_their_own_jobs_events_and_credits(admin: asyncpg.Connection) -> None:
    alice, bob = await new_auth_user(admin), await new_auth_user(admin)
    alice_jobs = {await create_job(admin, alice, "alice 1"), await create_job(admin, alice, "alice 2")}
    bob_job = await create_job(admin, bob, "bob 1")

    async with as_role(admin, "authenticated", alice):
        jobs = await admin.fetch("SELECT id, user_id FROM generation_jobs")
        events = await admin.fetch("SELECT DISTINCT job_id FROM job_events")
        accounts = await admin.fetch("SELECT user_id, balance FROM credit_accounts")
        ledger = await admin.fetch("SELECT DISTINCT user_id FROM credit_ledger")
        templates = await admin.fetchval("SELECT count(*) FROM templates")
        by_id = await admin.fetchval("SELECT count(*) FROM generation_jobs WHERE id = $1", bob_job)

    assert {str(r["id"]) for r in jobs} == alice_jobs
    assert {str(r["user_id"]) for r in jobs} == {alice}
    assert {str(r["job_id"]) for r in events} == alice_jobs
    assert [(str(r["user_id"]), r["balance"]) for r in accounts] == [(alice, 10 - 2)]
    assert {str(r["user_id"]) for r in ledger} == {alice}
    assert templates > 0, "the active templates are readable"
    assert by_id == 0, "another user's job is invisible, even by id"

    async with as_role(admin, "authenticated", bob):
        assert [str(r["id"]) for r in await admin.fetch("SELECT id FROM generation_jobs")] == [bob_job]
    async with as_role(admin, "authenticated"):  # a token without sub
        assert await admin.fetchval("SELECT count(*) FROM generation_jobs") == 0
    async with as_role(admin, "service_role"):
        assert await admin.fetchval("SELECT count(*) FROM generation_jobs WHERE user_id IN ($1, $2)", alice, bob) == 3


async def test_a_job_deleted_by_delete_job_is_gone_for_its_owners_app_too(admin: asyncpg.Connection) -> None:
    alice = await new_auth_user(admin)
    kept, deleted = await create_job(admin, alice, "kept"), await create_job(admin, alice, "deleted")
    # What DeleteJob writes (RetentionStore.mark_deleted); the row waits for its objects before it goes.
    await admin.execute("UPDATE generation_jobs SET deleted_at = now() WHERE id = $1", deleted)
    async with as_role(admin, "authenticated", alice):
        jobs = [str(r["id"]) for r in await admin.fetch("SELECT id FROM generation_jobs")]
        events = {str(r["job_id"]) for r in await admin.fetch("SELECT DISTINCT job_id FROM job_events")}
    assert jobs == [kept] and events == {kept}
    async with as_role(admin, "service_role"):  # operators still see it
        assert await admin.fetchval("SELECT count(*) FROM generation_jobs WHERE id = $1", deleted) == 1


async def test_app_clients_write_nothing_and_call_no_imagegen_function(admin: asyncpg.Connection) -> None:
    alice = await new_auth_user(admin)
    job = await create_job(admin, alice, "mine")

    writes = [
        (
            "INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts) VALUES ($1, 'x', 'local', "
            "'{}', 1)",
            alice,
        ),
        ("UPDATE generation_jobs SET status = 'completed' WHERE id = $1", job),
        ("DELETE FROM generation_jobs WHERE id = $1", job),
        ("INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES ($1, 99, 'x', 'pending', 0)", job),
        ("UPDATE credit_accounts SET balance = 1000000 WHERE user_id = $1", alice),
        ("INSERT INTO credit_ledger (user_id, kind, amount) VALUES ($1, 'grant', 1000000)", alice),
        ("DELETE FROM credit_ledger WHERE user_id = $1", alice),
        ("UPDATE templates SET price_per_image = 0 WHERE id = $1", "banner"),
        ("SELECT imagegen_grant_credits($1, 1000000, 'free money', true, 0)", alice),
        (
            "SELECT imagegen_advance(p_id => $1, p_attempt => NULL, p_from => '{pending}', p_event => 'cancelled', "
            "p_to => 'cancelled')",
            job,
        ),
    ]
    for sql, arg in writes:
        assert await refused(admin, "authenticated", alice, sql, arg), f"authenticated may not: {sql}"
    for sql, arg in writes[:3] + writes[8:]:
        assert await refused(admin, "anon", None, sql, arg), f"anon may not: {sql}"
    for table in OUR_TABLES:
        assert await refused(admin, "anon", None, f"SELECT 1 FROM {table}"), f"anon may not read {table}"

    assert await admin.fetchval("SELECT status FROM generation_jobs WHERE id = $1", job) == "pending"
    assert await admin.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", alice) == 9
    await assert_credits_consistent(admin)


async def test_jobs_reference_auth_users_and_a_deleted_user_takes_their_data_along(admin: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await create_job(admin, str(uuid.uuid4()), "a user Supabase Auth does not know")

    leaving, staying = await new_auth_user(admin), await new_auth_user(admin)
    await create_job(admin, leaving, "goodbye")
    kept = await create_job(admin, staying, "hello")
    await admin.execute("DELETE FROM auth.users WHERE id = $1", leaving)

    for table in ("generation_jobs", "credit_accounts", "credit_ledger"):
        assert await admin.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", leaving) == 0, table
    assert await admin.fetchval("SELECT count(*) FROM generation_jobs WHERE id = $1", kept) == 1
    await assert_credits_consistent(admin)


async def test_generation_jobs_are_published_to_realtime_with_full_rows(admin: asyncpg.Connection) -> None:
    published = await admin.fetchval(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'supabase_realtime' AND tablename = $1",
        "generation_jobs",
    )
    identity = await admin.fetchval("SELECT relreplident::text FROM pg_class WHERE oid = 'generation_jobs'::regclass")
    assert (published, identity) == (1, "f")


async def test_job_service_runs_on_the_supabase_database(supabase_url: str, tmp_path: Path) -> None:
    """JobService connects as the tables' owner, so RLS and the revoked grants do not get in its way."""
    admin = await asyncpg.connect(supabase_url)
    try:
        user = await new_auth_user(admin)
        token = mint_token(DEV_JWT_SECRET, user_id=user)
        async with running_services(supabase_url, tmp_path) as services, services.client(token=token) as client:
            job = await client.create_job("through JobService", sample_count=2)
            done = await client.wait(job.id, timeout=60)
        assert done.state == pb.JOB_STATE_COMPLETED
        async with as_role(admin, "authenticated", user):
            row = await admin.fetchrow("SELECT status, result_urls FROM generation_jobs WHERE id = $1", job.id)
        assert row is not None and row["status"] == "completed" and len(row["result_urls"]) == 2
        await assert_credits_consistent(admin)
    finally:
        await admin.close()


async def test_on_plain_postgresql_the_migration_is_recorded_and_changes_nothing(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT count(*) FROM schema_migrations WHERE name = $1", MIGRATION) == 1
    assert await db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'auth'") == 0
    rls = await db.fetch(
        "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) AND relrowsecurity", list(OUR_TABLES)
    )
    assert rls == []
    policies = await db.fetchval("SELECT count(*) FROM pg_policies WHERE tablename = ANY($1::text[])", list(OUR_TABLES))
    assert policies == 0
    assert await db.fetchval("SELECT relreplident::text FROM pg_class WHERE oid = 'generation_jobs'::regclass") == "d"
    assert await db.fetchval("SELECT count(*) FROM pg_publication WHERE pubname = 'supabase_realtime'") == 0
    ledger_keys = await db.fetch(
        "SELECT confrelid::regclass::text AS parent, confdeltype::text AS on_delete FROM pg_constraint "
        "WHERE conrelid = 'credit_ledger'::regclass AND contype = 'f' ORDER BY 1"
    )
    # The account key does not cascade here (no auth.users to follow). The job key is SET NULL, as on Supabase:
    # 20261206000220 made it so everywhere, so that a deleted job (DeleteJob, retention) leaves its ledger rows.
    assert [tuple(r) for r in ledger_keys] == [("credit_accounts", "a"), ("generation_jobs", "n")]


async def ledger_of(conn: asyncpg.Connection, user: str) -> list[tuple[str, int]]:
    rows = await conn.fetch("SELECT kind, amount FROM credit_ledger WHERE user_id = $1 ORDER BY id", user)
    return [(r["kind"], r["amount"]) for r in rows]


async def refused_any(conn: asyncpg.Connection, role: str, sql: str, *args: object) -> str | None:
    """The SQLSTATE the statement was refused with as `role`, or None if it went through."""
    try:
        async with as_role(conn, role):
            await conn.execute(sql, *args)
    except asyncpg.PostgresError as error:
        return str(error.sqlstate)
    return None


async def test_service_role_cannot_change_a_balance_or_the_ledger(admin: asyncpg.Connection) -> None:
    """balance = sum(ledger) holds against service_role too: it reads the money tables and writes none of them."""
    alice = await new_auth_user(admin)
    job = await create_job(admin, alice, "mine")
    before = await ledger_of(admin, alice)

    writes = [
        ("UPDATE credit_accounts SET balance = 1000000 WHERE user_id = $1", alice),
        ("UPDATE credit_accounts SET is_premium = true WHERE user_id = $1", alice),
        ("INSERT INTO credit_accounts (user_id, balance) VALUES ($1, 1000000)", str(uuid.uuid4())),
        ("DELETE FROM credit_accounts WHERE user_id = $1", alice),
        ("INSERT INTO credit_ledger (user_id, kind, amount) VALUES ($1, 'grant', 1000000)", alice),
        ("UPDATE credit_ledger SET amount = 1000000 WHERE user_id = $1", alice),
        ("DELETE FROM credit_ledger WHERE user_id = $1", alice),
        ("SELECT imagegen_grant_credits_v2($1, 1000000, 'free money', true, 0, NULL)", alice),
    ]
    for sql, arg in writes:
        assert await refused_any(admin, "service_role", sql, arg) is not None, f"service_role may not: {sql}"
    for table in ("credit_accounts", "credit_ledger", "generation_jobs"):
        # A trigger runs as whoever writes the row, and JobService writes as the tables' owner: a trigger of
        # service_role's on any of our tables would act as the owner.
        sql = (
            f"CREATE TRIGGER sneaky BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION imagegen_ledger_append_only()"
        )
        assert await refused(admin, "service_role", None, sql), f"service_role may not add triggers to {table}"
    async with as_role(admin, "service_role"):  # reading stays allowed
        assert await admin.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", alice) == 9

    assert await admin.fetchval("SELECT balance FROM credit_accounts WHERE user_id = $1", alice) == 9
    assert await ledger_of(admin, alice) == before
    assert await admin.fetchval("SELECT status FROM generation_jobs WHERE id = $1", job) == "pending"
    await assert_credits_consistent(admin)


async def test_service_role_cannot_write_the_job_rows_that_decide_a_charge(admin: asyncpg.Connection) -> None:
    """A job's credits_reserved is released into the balance when it ends: service_role raising it, or writing
    status or images, would mint credits or decide a charge outside JobService. It reads jobs and events and writes
    neither (deleting a job stays allowed: that can only take credits away, see the foreign-key test below)."""
    alice = await new_auth_user(admin)
    job = await create_job(admin, alice, "mine")
    writes = [
        ("UPDATE generation_jobs SET credits_reserved = 1000000 WHERE id = $1", job),
        ("UPDATE generation_jobs SET status = 'completed' WHERE id = $1", job),
        (
            "INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts, credits_reserved) "
            "VALUES ($1, 'p', 'local', '{}', 1, 1000000)",
            alice,
        ),
        ("DELETE FROM job_events WHERE job_id = $1", job),
        (
            "INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES ($1, 99, 'completed', 'completed', 1)",
            job,
        ),
    ]
    for sql, arg in writes:
        assert await refused_any(admin, "service_role", sql, arg) is not None, f"service_role may not: {sql}"
    async with as_role(admin, "service_role"):  # reading stays allowed
        assert await admin.fetchval("SELECT status FROM generation_jobs WHERE id = $1", job) == "pending"
        assert await admin.fetchval("SELECT count(*) FROM job_events WHERE job_id = $1", job) == 1
    row = await admin.fetchrow("SELECT status, credits_reserved FROM generation_jobs WHERE id = $1", job)
    assert (row["status"], row["credits_reserved"]) == ("pending", 1)
    await assert_credits_consistent(admin)


async def test_a_delete_from_inside_a_nested_trigger_is_refused(admin: asyncpg.Connection) -> None:
    """A trigger (anyone's, on any table) runs one level down like a foreign-key action; it gets no pass for that."""
    alice = await new_auth_user(admin)
    await create_job(admin, alice, "mine")
    before = await ledger_of(admin, alice)
    await admin.execute(
        """CREATE TABLE ledger_probe (user_id uuid);
           CREATE FUNCTION ledger_probe_wipe() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               DELETE FROM credit_ledger WHERE user_id = NEW.user_id;
               UPDATE credit_ledger SET job_id = NULL WHERE user_id = NEW.user_id;
               RETURN NEW;
           END $$;
           CREATE TRIGGER ledger_probe_wipe AFTER INSERT ON ledger_probe
               FOR EACH ROW EXECUTE FUNCTION ledger_probe_wipe();
           GRANT INSERT ON ledger_probe TO service_role"""
    )
    try:
        assert await refused_any(admin, "service_role", "INSERT INTO ledger_probe VALUES ($1)", alice) is not None
        with pytest.raises(asyncpg.PostgresError) as as_owner:  # even the owner's own trigger
            await admin.execute("INSERT INTO ledger_probe VALUES ($1)", alice)
        assert as_owner.value.sqlstate == "IG004"
    finally:
        await admin.execute("DROP TABLE ledger_probe; DROP FUNCTION ledger_probe_wipe()")
    assert await ledger_of(admin, alice) == before
    await assert_credits_consistent(admin)


async def test_the_foreign_key_actions_on_the_ledger_still_work(admin: asyncpg.Connection) -> None:
    """What the append-only rule lets through: deleting a job detaches its ledger rows (also when service_role
    deletes it), and deleting a user takes their account and ledger along."""
    alice, bob = await new_auth_user(admin), await new_auth_user(admin)
    by_owner, by_service = await create_job(admin, alice, "one"), await create_job(admin, alice, "two")
    await create_job(admin, bob, "bob's")
    await admin.execute("DELETE FROM generation_jobs WHERE id = $1", by_owner)
    async with as_role(admin, "service_role"):
        await admin.execute("DELETE FROM generation_jobs WHERE id = $1", by_service)

    rows = await admin.fetch("SELECT kind, amount, job_id FROM credit_ledger WHERE user_id = $1 ORDER BY id", alice)
    assert [(r["kind"], r["amount"], r["job_id"]) for r in rows] == [
        ("grant", 10, None),
        ("reserve", -1, None),
        ("reserve", -1, None),
    ], "the rows stay, detached from the deleted jobs"
    await assert_credits_consistent(admin)

    await admin.execute("DELETE FROM auth.users WHERE id = $1", bob)
    assert await admin.fetchval("SELECT count(*) FROM credit_ledger WHERE user_id = $1", bob) == 0
    assert await admin.fetchval("SELECT count(*) FROM credit_accounts WHERE user_id = $1", bob) == 0
    await assert_credits_consistent(admin)


async def test_storage_cleanups_are_internal_app_clients_neither_read_nor_write_them(admin: asyncpg.Connection) -> None:
    alice = await new_auth_user(admin)
    await admin.execute("INSERT INTO storage_cleanups (job_id, user_id) VALUES ($1, $2)", str(uuid.uuid4()), alice)
    for role, user in (("anon", None), ("authenticated", alice)):
        assert await refused(admin, role, user, "SELECT 1 FROM storage_cleanups"), f"{role} may not read them"
        assert await refused(admin, role, user, "DELETE FROM storage_cleanups"), f"{role} may not delete them"
        assert await refused(
            admin, role, user, "INSERT INTO storage_cleanups (job_id, user_id) VALUES ($1, $1)", alice
        ), f"{role} may not add one"
    assert await admin.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = 'storage_cleanups'::regclass")
    async with as_role(admin, "service_role"):
        assert await admin.fetchval("SELECT count(*) FROM storage_cleanups WHERE user_id = $1", alice) == 1


async def test_webhook_deliveries_are_internal_and_service_role_only_reads_them(admin: asyncpg.Connection) -> None:
    alice = await new_auth_user(admin)
    params = '{"sample_count": 1, "webhook": {"url": "https://hooks.example.com/x", "events": ["job.started"]}}'
    job_id = await admin.fetchval(
        """INSERT INTO generation_jobs (user_id, prompt, model, params, max_attempts)
           VALUES ($1, 'p', 'local', $2::jsonb, 3) RETURNING id""",
        alice,
        params,
    )
    await admin.execute(
        "INSERT INTO job_events (job_id, seq, type, status, attempt) "
        "VALUES ($1, 1, 'attempt_started', 'generating', 1)",
        job_id,
    )
    for role, user in (("anon", None), ("authenticated", alice)):
        for table in ("webhook_deliveries", "webhook_attempts"):
            assert await refused(admin, role, user, f"SELECT 1 FROM {table}"), f"{role} may not read {table}"
        assert await refused(admin, role, user, "DELETE FROM webhook_deliveries"), f"{role} may not delete them"
    for statement in (
        "INSERT INTO webhook_deliveries (job_id, seq, type, url, job, event_at) "
        "VALUES ($1, 9, 'job.completed', 'http://169.254.169.254/', '{}', now())",
        "UPDATE webhook_deliveries SET url = 'http://10.0.0.1/' WHERE job_id = $1",
    ):
        assert await refused(admin, "service_role", None, statement, job_id), statement
    for table in ("webhook_deliveries", "webhook_attempts"):
        assert await admin.fetchval(f"SELECT relrowsecurity FROM pg_class WHERE oid = '{table}'::regclass")
    async with as_role(admin, "service_role"):
        assert await admin.fetchval("SELECT count(*) FROM webhook_deliveries WHERE job_id = $1", job_id) == 1
