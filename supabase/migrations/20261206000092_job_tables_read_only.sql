-- On Supabase, service_role kept every right on generation_jobs and job_events (20261128000030 granted it ALL).
-- A job row carries money: credits_reserved is released into the balance when the job ends, images and
-- price_per_image decide the capture. So service_role raising credits_reserved by hand minted credits at the next
-- settlement (with a matching ledger row: balance = sum(ledger) held, but the money came from nowhere), and
-- writing status or images decided what a user was charged. It now reads them and writes neither (as for the
-- money tables, 20261206000091): jobs move through JobService, which connects as the tables' owner. It may still
-- DELETE a job (an administrator removing one; its ledger rows stay, detached, and the cascade to its events runs
-- as the owner), which can only take credits away from the job's user, never make them.
DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE INSERT, UPDATE, TRUNCATE, REFERENCES ON generation_jobs FROM PUBLIC, anon, authenticated, service_role;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES ON job_events FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON generation_jobs, job_events TO service_role;
    END IF;
END
$supabase$;
