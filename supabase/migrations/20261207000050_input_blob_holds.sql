-- How many CreateJob calls in progress stored each input image and have not finished yet (issue 19). A create adds
-- one when it stores the bytes and takes it back when it ends; a refused create then deletes the images it stored
-- that no job names and no other create in progress holds (job_service/input_holds.py), instead of leaving them to
-- the orphan sweep for an hour. A create that dies in between leaves its count behind: the orphan sweep still
-- deletes an unnamed image once no create has stored it for JOB_INPUT_BLOB_GRACE (it ignores the count).
ALTER TABLE job_input_blobs ADD COLUMN IF NOT EXISTS holds integer NOT NULL DEFAULT 0 CHECK (holds >= 0);
