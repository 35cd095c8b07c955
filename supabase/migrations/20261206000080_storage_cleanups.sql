-- Storage cleanups: the durable list of job folders whose objects still have to be swept from the bucket.
--
-- An attempt stores each image before its IMAGE_STORED event is written; an attempt that is cancelled, fenced
-- out, loses its lease, whose replica dies or whose event write fails leaves objects in the bucket that no job
-- row records (orphans). A row here says "delete what is under {user_id}/{job_id}/ in storage, except the job's
-- recorded images (keep_all_recorded) or except nothing". JobService's sweeper (job_service/cleanup.py) takes
-- due rows, asks the generator to delete (DeleteJobObjects) and deletes the row only once that succeeded; a
-- failure keeps the row with its tries and last error and a later not_before. See docs/durability.md.
--
-- No foreign key to generation_jobs: a job deleted (with its user, or by DeleteJob later) must still have its
-- objects swept, so the row outlives it (and then nothing is recorded to keep).

CREATE TABLE IF NOT EXISTS storage_cleanups (
    job_id            uuid PRIMARY KEY,
    user_id           uuid NOT NULL,
    -- true: keep the job's recorded images (generation_jobs.result_paths and images[].storage_path, read when the
    -- row is swept); false: delete every object of the job.
    keep_all_recorded boolean NOT NULL DEFAULT true,
    -- Not swept before this; the sweeper pushes it forward as a lease while it works on the row, and as the
    -- backoff after a failure.
    not_before        timestamptz NOT NULL DEFAULT now(),
    tries             integer NOT NULL DEFAULT 0,
    last_error        text,
    -- When the job ended; the sweeper waits JOB_CLEANUP_DELAY_SECONDS past it, so that an attempt still running
    -- at a generator (for a replica that died or lost its lease) has ended before its folder is swept.
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS storage_cleanups_due ON storage_cleanups (not_before);

-- Written in the transaction that ends the job, so a job never ends without its sweep being recorded, whichever
-- function ended it. A job completed by its first attempt has every image it uploaded recorded (each upload's
-- event was written before the completion), so it needs no sweep; a job never claimed (attempt 0: cancelled
-- while pending) never reached a generator.
CREATE OR REPLACE FUNCTION imagegen_record_storage_cleanup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO storage_cleanups (job_id, user_id) VALUES (NEW.id, NEW.user_id)
        ON CONFLICT (job_id) DO NOTHING;  -- one already waiting (say, a deletion of everything) stays as it is
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS generation_jobs_storage_cleanup ON generation_jobs;
CREATE TRIGGER generation_jobs_storage_cleanup
    AFTER UPDATE OF status ON generation_jobs
    FOR EACH ROW
    WHEN (
        NEW.status IN ('completed', 'failed', 'cancelled')
        AND OLD.status NOT IN ('completed', 'failed', 'cancelled')
        AND NEW.attempt > 0
        AND (NEW.status <> 'completed' OR NEW.attempt > 1)
    )
    EXECUTE FUNCTION imagegen_record_storage_cleanup();

-- Supabase: an internal table like the ledger's bookkeeping; app clients get nothing of it (RLS on, no policy,
-- no grant), service_role keeps its usual access. A no-op on plain PostgreSQL, as 20261128000030 is.
DO $supabase$
DECLARE
    jobs_schema text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        RAISE NOTICE 'no auth schema: not a Supabase database, nothing to do';
        RETURN;
    END IF;
    SELECT n.nspname INTO jobs_schema
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'storage_cleanups'::regclass;
    ALTER TABLE storage_cleanups ENABLE ROW LEVEL SECURITY;
    REVOKE ALL ON storage_cleanups FROM anon, authenticated;
    GRANT ALL ON storage_cleanups TO service_role;
    EXECUTE format('REVOKE ALL ON FUNCTION %I.imagegen_record_storage_cleanup() FROM PUBLIC, anon, authenticated',
                   jobs_schema);
END
$supabase$;
