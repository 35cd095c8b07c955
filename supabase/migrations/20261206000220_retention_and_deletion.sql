-- Retention and deletion of jobs (docs/durability.md, "Retention and deletion").
--
-- One deletion mechanism: a job's objects go through storage_cleanups (20261206000080) with nothing kept
-- (keep_all_recorded = false), swept by the same sweeper and DeleteJobObjects as the orphans of attempts; the job
-- row goes only after that row has gone, i.e. after the generator confirmed the folder empty. storage_cleanups has
-- no foreign key, so its row outlives the job's in every order of events.
--
--   images_deleted_at  set when the job's objects were queued for deletion (retention, or DeleteJob): from then on
--                      the job's images answer as deleted (no URL), whether or not the sweep has run yet.
--   deleted_at         set by DeleteJob: the job answers NOT_FOUND at once, and its row is deleted once it has
--                      ended and its objects are gone.

ALTER TABLE generation_jobs ADD COLUMN IF NOT EXISTS images_deleted_at timestamptz;
ALTER TABLE generation_jobs ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

-- The retention pass's two looks, each over ended jobs only (the active ones are few and never due):
-- ended jobs whose images are still there, oldest end first; and jobs whose objects were queued, to delete.
CREATE INDEX IF NOT EXISTS generation_jobs_images_kept
    ON generation_jobs (completed_at)
    WHERE images_deleted_at IS NULL AND status NOT IN ('pending', 'generating');
CREATE INDEX IF NOT EXISTS generation_jobs_images_deleted
    ON generation_jobs (completed_at)
    WHERE images_deleted_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS generation_jobs_deleted
    ON generation_jobs (deleted_at)
    WHERE deleted_at IS NOT NULL;

-- A ledger row outlives its job: deleting a job sets the row's job_id to NULL, so balance = sum(ledger) still
-- holds for its user (20261128000030 did this on Supabase only; plain PostgreSQL kept NO ACTION, which refused
-- to delete any job that had reserved credits). 20261206000091's trigger lets exactly this UPDATE through: run by
-- the referential action as the ledger's owner, job_id to NULL, the job gone, nothing else changed. NOT VALID
-- then VALIDATE: the ledger is not locked against writes while its rows are checked.
DO $ledger$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
        WHERE conrelid = 'credit_ledger'::regclass AND contype = 'f'
          AND confrelid = 'generation_jobs'::regclass AND confdeltype <> 'n'
    LOOP
        EXECUTE format('ALTER TABLE credit_ledger DROP CONSTRAINT %I', fk.conname);
        EXECUTE format('ALTER TABLE credit_ledger ADD CONSTRAINT %I %s ON DELETE SET NULL NOT VALID',
                       fk.conname, fk.def);
        EXECUTE format('ALTER TABLE credit_ledger VALIDATE CONSTRAINT %I', fk.conname);
    END LOOP;
END
$ledger$;

-- Supabase: a job deleted by DeleteJob is gone for its owner's app as well (PostgREST, Realtime), not only for the
-- gRPC API, while its row waits for its objects; its events go with it (their policy reads the job through this
-- one). The policy of 20261128000030 otherwise unchanged. A no-op on plain PostgreSQL.
DO $supabase$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        RAISE NOTICE 'no auth schema: not a Supabase database, nothing to do';
        RETURN;
    END IF;
    DROP POLICY IF EXISTS generation_jobs_read_own ON generation_jobs;
    CREATE POLICY generation_jobs_read_own ON generation_jobs
        FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()) AND deleted_at IS NULL);
END
$supabase$;
