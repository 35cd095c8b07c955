-- Input images of jobs (issue 19): the bytes a caller sent inline with CreateJob, stored once per user and content
-- (sha256), next to the jobs that name them in params.input_images. A reference to an earlier job's delivered image
-- needs no row here: the job names that image's storage key and the generator reads it from its storage.
--
-- Rows are written before the job that uses them (CreateJob checks and stores the bytes, then creates the job);
-- a row no job names (a refused CreateJob) is left for a sweeper to remove, and the primary key makes a retried or
-- repeated upload of the same image a no-op.
CREATE TABLE IF NOT EXISTS job_input_blobs (
    user_id uuid NOT NULL,
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    mime_type text NOT NULL CHECK (mime_type IN ('image/png', 'image/jpeg', 'image/webp')),
    data bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, sha256)
);

-- Only JobService (the tables' owner) reads and writes them; on Supabase no client role gets anything.
ALTER TABLE job_input_blobs ENABLE ROW LEVEL SECURITY;

DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE ALL ON job_input_blobs FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON job_input_blobs TO service_role;
    END IF;
END
$supabase$;
