-- Supabase only: ties imagegen's tables to Supabase Auth, Row Level Security and Realtime.
--
-- The whole file is one DO block that returns at once where there is no `auth` schema, so it is a no-op on
-- plain PostgreSQL (embedded, RDS, ...) and the same ordered list of migrations serves every database.
-- On Supabase (`supabase db push`, or `python -m job_service migrate` against the project's database) it:
--   * links generation_jobs.user_id and credit_accounts.user_id to auth.users(id), ON DELETE CASCADE so that
--     deleting a user in Supabase removes their jobs, events, account and ledger instead of failing;
--   * turns on RLS everywhere: an app client (role `authenticated`) may read its own jobs, the events of its
--     own jobs, its own credit account and ledger, and the active templates, and write nothing (jobs are
--     made, cancelled and charged only through JobService, which connects as the tables' owner);
--   * replaces Supabase's default "anon and authenticated may do anything" grants with exactly that, and
--     keeps the imagegen_* SQL functions (which move money) away from app clients;
--   * publishes generation_jobs to Realtime (`supabase_realtime`, REPLICA IDENTITY FULL), so an app can
--     follow a job the way the seed does, next to WatchJob.
-- See docs/supabase.md.

DO $supabase$
DECLARE
    jobs_schema text;
    fn regprocedure;
    fk record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        RAISE NOTICE 'no auth schema: not a Supabase database, nothing to do';
        RETURN;
    END IF;
    IF to_regclass('auth.users') IS NULL
       OR (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) <> 3 THEN
        RAISE EXCEPTION 'an auth schema exists, but not auth.users and the roles anon, authenticated and '
                        'service_role: this does not look like a Supabase database';
    END IF;
    SELECT n.nspname INTO jobs_schema
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'generation_jobs'::regclass;

    -- Foreign keys to auth.users. NOT VALID first, so rows written before this migration (say, with
    -- development tokens) cannot make it fail; new rows are checked from now on either way.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'generation_jobs_user_id_auth_users_fkey') THEN
        ALTER TABLE generation_jobs ADD CONSTRAINT generation_jobs_user_id_auth_users_fkey
            FOREIGN KEY (user_id) REFERENCES auth.users (id) ON DELETE CASCADE NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'credit_accounts_user_id_auth_users_fkey') THEN
        ALTER TABLE credit_accounts ADD CONSTRAINT credit_accounts_user_id_auth_users_fkey
            FOREIGN KEY (user_id) REFERENCES auth.users (id) ON DELETE CASCADE NOT VALID;
    END IF;
    BEGIN
        ALTER TABLE generation_jobs VALIDATE CONSTRAINT generation_jobs_user_id_auth_users_fkey;
        ALTER TABLE credit_accounts VALIDATE CONSTRAINT credit_accounts_user_id_auth_users_fkey;
    EXCEPTION WHEN foreign_key_violation THEN
        RAISE WARNING 'some generation_jobs or credit_accounts rows name users that are not in auth.users; '
                      'the foreign keys check new rows only until those rows are removed and the constraints '
                      'validated (ALTER TABLE ... VALIDATE CONSTRAINT ...)';
    END;

    -- Deleting a user deletes their account and jobs (above); the ledger must follow instead of blocking
    -- it. A ledger row outlives its job (job_id becomes NULL), so balance = sum(ledger) still holds for a
    -- user whose single job an operator deleted.
    FOR fk IN
        SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
        WHERE conrelid = 'credit_ledger'::regclass AND contype = 'f' AND confdeltype = 'a'
    LOOP
        EXECUTE format('ALTER TABLE credit_ledger DROP CONSTRAINT %I', fk.conname);
        EXECUTE format(
            'ALTER TABLE credit_ledger ADD CONSTRAINT %I %s %s', fk.conname, fk.def,
            CASE WHEN fk.def LIKE 'FOREIGN KEY (job_id)%' THEN 'ON DELETE SET NULL' ELSE 'ON DELETE CASCADE' END
        );
    END LOOP;

    -- Row Level Security. The tables' owner (JobService's connection, `postgres` on Supabase) is not subject
    -- to it, and service_role bypasses it; everyone else sees only what a policy below allows.
    ALTER TABLE generation_jobs ENABLE ROW LEVEL SECURITY;
    ALTER TABLE job_events ENABLE ROW LEVEL SECURITY;
    ALTER TABLE credit_accounts ENABLE ROW LEVEL SECURITY;
    ALTER TABLE credit_ledger ENABLE ROW LEVEL SECURITY;
    ALTER TABLE templates ENABLE ROW LEVEL SECURITY;

    DROP POLICY IF EXISTS generation_jobs_read_own ON generation_jobs;
    CREATE POLICY generation_jobs_read_own ON generation_jobs
        FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));
    DROP POLICY IF EXISTS job_events_read_own ON job_events;
    CREATE POLICY job_events_read_own ON job_events
        FOR SELECT TO authenticated USING (
            EXISTS (SELECT 1 FROM generation_jobs j WHERE j.id = job_events.job_id AND j.user_id = (SELECT auth.uid()))
        );
    DROP POLICY IF EXISTS credit_accounts_read_own ON credit_accounts;
    CREATE POLICY credit_accounts_read_own ON credit_accounts
        FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));
    DROP POLICY IF EXISTS credit_ledger_read_own ON credit_ledger;
    CREATE POLICY credit_ledger_read_own ON credit_ledger
        FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));
    DROP POLICY IF EXISTS templates_read_active ON templates;
    CREATE POLICY templates_read_active ON templates
        FOR SELECT TO authenticated USING (is_active);

    -- Grants. Supabase's default privileges give anon and authenticated every right on every new table and
    -- function in public; RLS alone would already stop them, but a grant that is not there cannot be misused
    -- by a policy added later. Reading stays with authenticated; anon gets nothing of ours.
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO anon, authenticated, service_role', jobs_schema);
    REVOKE ALL ON generation_jobs, job_events, credit_accounts, credit_ledger, templates FROM anon, authenticated;
    GRANT SELECT ON generation_jobs, job_events, credit_accounts, credit_ledger, templates TO authenticated;
    GRANT ALL ON generation_jobs, job_events, credit_accounts, credit_ledger, templates TO service_role;
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM anon, authenticated', pg_get_serial_sequence('credit_ledger', 'id'));
    EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO service_role', pg_get_serial_sequence('credit_ledger', 'id'));
    -- The migration runner's bookkeeping (absent when the migrations were applied with `supabase db push`).
    IF to_regclass('schema_migrations') IS NOT NULL THEN
        ALTER TABLE schema_migrations ENABLE ROW LEVEL SECURITY;
        REVOKE ALL ON schema_migrations FROM anon, authenticated;
        GRANT ALL ON schema_migrations TO service_role;
    END IF;
    -- The functions that create jobs, grant credits and settle them run as their caller; an app client
    -- calling them (PostgREST exposes functions as /rpc/...) is refused before any of that.
    FOR fn IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = jobs_schema::regnamespace AND p.proname LIKE 'imagegen\_%'
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', fn);
    END LOOP;

    -- Realtime: postgres_changes on generation_jobs, checked against the policies above per subscriber.
    -- FULL sends the old row too (an UPDATE's previous status).
    ALTER TABLE generation_jobs REPLICA IDENTITY FULL;
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        CREATE PUBLICATION supabase_realtime;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime' AND puballtables)
       AND NOT EXISTS (
           SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
           WHERE p.pubname = 'supabase_realtime' AND r.prrelid = 'generation_jobs'::regclass
       ) THEN
        ALTER PUBLICATION supabase_realtime ADD TABLE generation_jobs;
    END IF;
END
$supabase$;
