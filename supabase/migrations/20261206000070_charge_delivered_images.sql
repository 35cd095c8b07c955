-- An image is delivered when its image_stored event commits: from then on its URL may have been shown (WatchJob,
-- GetJob, Realtime). Every delivered image stays the user's and is charged exactly once, at settlement, whatever
-- the terminal state (completed, failed or cancelled); no user pays for an image that was not delivered.
--
-- Before this migration a claim emptied the job's images (a retry started from nothing, so a job could deliver
-- more than sample_count images in all), and a failed or cancelled job captured 0 whatever it had delivered. Now:
--   * imagegen_claim_jobs keeps images, result_urls and result_paths across attempts. JobService asks each attempt
--     for the images still owed (sample_count minus those delivered), so a job never delivers more than
--     sample_count. (A job created and claimed at once, imagegen_create_job_v3, is inserted with no images: it
--     has nothing to keep, so it is not redefined.)
--   * imagegen_advance gives each image its job-level index as it appends it: its place among the job's images in
--     delivery order, 0..n-1 whichever attempt stored it (the generator's index counts within its attempt; the
--     storage path, {attempt}-{index}, keeps that one). It settles charge = least(delivered * price, reserved) for
--     every terminal state, and the capture row counts the delivered images in every terminal state (premium:
--     a capture of 0 with the images counted). Release stays all of the reservation, so balance = sum(ledger).
--   * Completing a job clears the error_code and error_message an earlier attempt left (Realtime readers saw a
--     completed job with the error of a retried attempt).
-- filtered_count / filtered_reasons stay those of the attempt that completed: a failed attempt never reports
-- its filtered images (the generator sends them with its completion only), and the completing attempt was asked
-- only for what was owed, so delivered + filtered <= sample_count.
--
-- Signatures are unchanged, so the Supabase grants of 20261128000030 still apply.

COMMENT ON COLUMN generation_jobs.images IS
    'Images delivered so far, by every attempt, in delivery order: [{index, url, storage_path, mime_type, width, '
    'height, size_bytes}], index = position (0..n-1). Each is charged at settlement, whatever the terminal state.';

-- As in 20261128000003, with the three changes above (index, charge for every terminal state, error cleared).
CREATE OR REPLACE FUNCTION imagegen_advance(
    p_id uuid,
    p_attempt integer,           -- NULL: any attempt
    p_from text[],               -- the statuses the job may be in
    p_event text,
    p_to text DEFAULT NULL,      -- NULL: status unchanged
    p_message text DEFAULT NULL,
    p_error_code text DEFAULT NULL,
    p_image jsonb DEFAULT NULL,  -- appended to images
    p_filtered integer DEFAULT NULL,
    p_filtered_reasons text[] DEFAULT NULL,
    p_retry_delay double precision DEFAULT NULL,  -- seconds until a job sent back to pending is due
    p_cancel_requested boolean DEFAULT NULL,
    p_count_failure boolean DEFAULT false,
    p_only_if_lease_expired boolean DEFAULT false
) RETURNS generation_jobs
LANGUAGE plpgsql AS $$
DECLARE
    j        generation_jobs;
    status_to text;
    charge   bigint := 0;
    released bigint;
    seq      bigint;
BEGIN
    SELECT * INTO j FROM generation_jobs WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR NOT (j.status = ANY (p_from)) OR (p_attempt IS NOT NULL AND j.attempt <> p_attempt) THEN
        RETURN NULL;
    END IF;
    IF p_only_if_lease_expired AND (j.lease_expires_at IS NULL OR j.lease_expires_at >= now()) THEN
        RETURN NULL;
    END IF;

    status_to := coalesce(p_to, j.status);
    IF p_image IS NOT NULL THEN
        -- The job-level index: the image's place in delivery order, across attempts.
        j.images := j.images || jsonb_build_array(p_image || jsonb_build_object('index', jsonb_array_length(j.images)));
        j.result_urls := j.result_urls || (p_image ->> 'url');
        j.result_paths := j.result_paths || (p_image ->> 'storage_path');
    END IF;
    IF p_filtered IS NOT NULL THEN
        j.filtered_count := p_filtered;
        j.filtered_reasons := coalesce(p_filtered_reasons, '{}');
    END IF;
    IF p_cancel_requested IS NOT NULL THEN
        j.cancel_requested := p_cancel_requested;
    END IF;
    IF p_count_failure THEN
        j.failed_attempts := j.failed_attempts + 1;
    END IF;
    IF p_error_code IS NOT NULL THEN
        j.error_code := p_error_code;
        j.error_message := p_message;
    END IF;
    IF status_to = 'completed' THEN
        -- The error of an earlier attempt is not the completed job's.
        j.error_code := NULL;
        j.error_message := NULL;
    END IF;

    IF status_to IN ('completed', 'failed', 'cancelled') THEN
        -- Settle the reservation exactly once, with the terminal state: release all of it, capture what was
        -- delivered (by any attempt, whatever the terminal state). The unique (job_id, kind) index refuses a
        -- second settlement outright.
        charge := least(jsonb_array_length(j.images)::bigint * j.price_per_image, j.credits_reserved);
        released := j.credits_reserved;
        UPDATE credit_accounts SET balance = balance + released - charge, updated_at = now()
            WHERE user_id = j.user_id;
        INSERT INTO credit_ledger (user_id, job_id, kind, amount, images)
            VALUES (j.user_id, j.id, 'release', released, 0),
                   (j.user_id, j.id, 'capture', -charge, jsonb_array_length(j.images));
        j.credits_charged := charge;
        j.credits_reserved := 0;
        j.completed_at := now();
        j.lease_owner := NULL;
        j.lease_expires_at := NULL;
    ELSIF status_to = 'pending' THEN
        j.lease_owner := NULL;
        j.lease_expires_at := NULL;
        j.next_attempt_at := now() + make_interval(secs => coalesce(p_retry_delay, 0));
    END IF;

    seq := j.last_event_seq + 1;
    UPDATE generation_jobs SET
        status = status_to, images = j.images, result_urls = j.result_urls, result_paths = j.result_paths,
        filtered_count = j.filtered_count, filtered_reasons = j.filtered_reasons,
        cancel_requested = j.cancel_requested, failed_attempts = j.failed_attempts,
        error_code = j.error_code, error_message = j.error_message,
        credits_charged = j.credits_charged, credits_reserved = j.credits_reserved,
        completed_at = j.completed_at, lease_owner = j.lease_owner, lease_expires_at = j.lease_expires_at,
        next_attempt_at = j.next_attempt_at, last_event_seq = seq, updated_at = now()
    WHERE id = p_id
    RETURNING * INTO j;
    INSERT INTO job_events (job_id, seq, type, status, attempt, detail)
        VALUES (p_id, seq, p_event, status_to, j.attempt,
                jsonb_strip_nulls(jsonb_build_object('message', p_message, 'error_code', p_error_code)));
    PERFORM pg_notify('imagegen_jobs', p_id::text || ':' || seq || ':' || p_event);
    RETURN j;
END;
$$;

-- As in 20261128000003, except that a claim keeps the images earlier attempts delivered.
CREATE OR REPLACE FUNCTION imagegen_claim_jobs(p_owner text, p_limit integer, p_lease_seconds double precision)
RETURNS SETOF generation_jobs
LANGUAGE plpgsql AS $$
DECLARE
    j generation_jobs;
BEGIN
    FOR j IN
        WITH due AS (
            SELECT id FROM generation_jobs
            WHERE status = 'pending' AND next_attempt_at <= now()
            ORDER BY next_attempt_at
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ), claimed AS (
            UPDATE generation_jobs g SET
                status = 'generating', attempt = g.attempt + 1, lease_owner = p_owner,
                lease_expires_at = now() + make_interval(secs => p_lease_seconds),
                started_at = coalesce(g.started_at, now()), updated_at = now(),
                filtered_count = 0, filtered_reasons = '{}', last_event_seq = g.last_event_seq + 1
            FROM due WHERE g.id = due.id
            RETURNING g.*
        ), events AS (
            INSERT INTO job_events (job_id, seq, type, status, attempt, detail)
            SELECT c.id, c.last_event_seq, 'attempt_started', 'generating', c.attempt,
                   jsonb_build_object('worker', p_owner)
            FROM claimed c
        )
        SELECT * FROM claimed
    LOOP
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':' || j.last_event_seq || ':attempt_started');
        RETURN NEXT j;
    END LOOP;
END;
$$;
