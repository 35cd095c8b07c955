-- CreateJob in a straight line (issue 17, item 1): the create function answers what happened, so JobService
-- neither rewrites the job it gets back nor makes up the events the function wrote.
--
-- imagegen_create_job_v5 is imagegen_create_job_v4 (20261206000210) with the same parameters and the same body;
-- only what it returns differs:
--   job      the job as its 'created' event (seq 1) left it: pending, attempt 0, not leased. CreateJob answers this
--            (JOB_STATE_PENDING, as the API says). For an idempotent replay: the earlier job as it is now.
--   created  false for an idempotent replay of request_id (nothing was written).
--   claimed  the row as this call left it when it also claimed the job for p_claim_owner (generating, attempt 1,
--            leased); NULL when it did not (no p_claim_owner, a due job ahead of it in the queue, or a replay).
--   events   the job_events rows this call committed, in seq order: 'created', then 'attempt_started' when it
--            claimed; none for a replay.
-- imagegen_create_jobs_v3 is imagegen_create_jobs_v2 over v5, with the same two more columns.
--
-- imagegen_create_job_v4 now calls v5 (one body for both) and answers as it always did (the claimed row when it
-- claimed), so a replica of the previous version keeps working through an upgrade; imagegen_create_job_v3 and
-- imagegen_create_jobs_v2 call v4, unchanged.

CREATE OR REPLACE FUNCTION imagegen_create_job_v5(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    p_claim_owner text, p_lease_seconds double precision,
    p_priority integer, p_priority_rules integer[], p_start_within double precision,
    p_aging_seconds double precision, p_rate_limits integer[], p_rate_window_seconds double precision,
    OUT job generation_jobs, OUT created boolean, OUT claimed generation_jobs, OUT events job_events[]
)
LANGUAGE plpgsql AS $$
DECLARE
    acct     credit_accounts;
    j        generation_jobs;
    active   integer;
    hold     bigint;
    prio     integer;
    max_prio integer;
    lim      integer;
    win      double precision := coalesce(p_rate_window_seconds, 60);
    nth      timestamptz;
    v_key    timestamptz;
    head     timestamptz;
    claim    text := p_claim_owner;
    ev       job_events;
BEGIN
    PERFORM imagegen_ensure_account(p_user, p_new_user_credits);
    -- The account row lock serialises one user's creates: the idempotency check, the rate limit, the active-job
    -- cap and the balance check below cannot race each other.
    SELECT * INTO acct FROM credit_accounts WHERE user_id = p_user FOR UPDATE;

    IF p_request_id IS NOT NULL THEN
        SELECT * INTO j FROM generation_jobs WHERE user_id = p_user AND request_id = p_request_id;
        IF FOUND THEN
            IF j.request_hash IS DISTINCT FROM p_request_hash THEN
                RAISE EXCEPTION 'request_id % was already used for a different request', p_request_id
                    USING ERRCODE = 'IG003';
            END IF;
            job := j;
            created := false;
            events := '{}';
            RETURN;
        END IF;
    END IF;

    lim := CASE WHEN acct.is_premium THEN p_rate_limits[2] ELSE p_rate_limits[1] END;
    IF coalesce(lim, 0) > 0 THEN
        -- The lim-th newest job the user created within the window (index generation_jobs_user_created, at most
        -- lim entries read): if there is one, this create would be one too many until it leaves the window.
        SELECT created_at INTO nth FROM generation_jobs
            WHERE user_id = p_user AND created_at > now() - make_interval(secs => win)
            ORDER BY created_at DESC OFFSET lim - 1 LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'at most % jobs per % seconds', lim, win
                USING ERRCODE = 'IG005',
                      DETAIL = jsonb_build_object('limit', lim, 'window_seconds', win, 'retry_after',
                          greatest(extract(epoch FROM nth + make_interval(secs => win) - now()), 0.001))::text;
        END IF;
    END IF;

    IF p_priority_rules IS NULL THEN
        prio := coalesce(p_priority, 5);
    ELSE
        max_prio := CASE WHEN acct.is_premium THEN p_priority_rules[4] ELSE p_priority_rules[2] END;
        prio := coalesce(p_priority, CASE WHEN acct.is_premium THEN p_priority_rules[3] ELSE p_priority_rules[1] END);
        IF p_priority IS NOT NULL AND p_priority > max_prio THEN
            RAISE EXCEPTION 'priority % is above the most this account may ask for (%)', p_priority, max_prio
                USING ERRCODE = 'IG006', DETAIL = jsonb_build_object('max', max_prio)::text;
        END IF;
        prio := least(prio, greatest(max_prio, 0));
    END IF;

    SELECT count(*) INTO active FROM generation_jobs
        WHERE user_id = p_user AND status IN ('pending', 'generating');
    IF active >= p_active_limit THEN
        RAISE EXCEPTION 'the user already has % active jobs (limit %)', active, p_active_limit
            USING ERRCODE = 'IG002';
    END IF;

    hold := CASE WHEN acct.is_premium THEN 0 ELSE p_price::bigint * p_sample_count END;
    IF acct.balance < hold THEN
        RAISE EXCEPTION 'the job needs % credits; the balance is %', hold, acct.balance
            USING ERRCODE = 'IG001';
    END IF;

    v_key := now() - make_interval(secs => prio * coalesce(p_aging_seconds, 60));
    -- Claimed at create only if no due job that goes before it is waiting: it must not jump the queue. The head
    -- of the queue is read as the claim reads it (the same filter and order, so the same index scan, stopping at
    -- the first due job).
    IF claim IS NOT NULL THEN
        SELECT dispatch_at INTO head FROM generation_jobs
            WHERE status = 'pending' AND next_attempt_at <= now()
              AND (start_deadline IS NULL OR attempt > 0 OR start_deadline > now())
            ORDER BY dispatch_at LIMIT 1;
        IF FOUND AND head < v_key THEN
            claim := NULL;
        END IF;
    END IF;

    IF claim IS NULL THEN
        INSERT INTO generation_jobs (user_id, template_id, prompt, model, params, request_id, request_hash,
                                     max_attempts, credits_reserved, price_per_image, last_event_seq,
                                     priority, dispatch_at, start_deadline)
            VALUES (p_user, p_template_id, p_prompt, p_model, p_params, p_request_id, p_request_hash,
                    p_max_attempts, hold, p_price, 1,
                    prio, v_key, now() + make_interval(secs => p_start_within))
            RETURNING * INTO j;
    ELSE
        INSERT INTO generation_jobs (user_id, template_id, prompt, model, params, request_id, request_hash,
                                     max_attempts, credits_reserved, price_per_image, last_event_seq,
                                     status, attempt, lease_owner, lease_expires_at, started_at,
                                     priority, dispatch_at, start_deadline)
            VALUES (p_user, p_template_id, p_prompt, p_model, p_params, p_request_id, p_request_hash,
                    p_max_attempts, hold, p_price, 2,
                    'generating', 1, claim, now() + make_interval(secs => p_lease_seconds), now(),
                    prio, v_key, now() + make_interval(secs => p_start_within))
            RETURNING * INTO j;
    END IF;
    UPDATE credit_accounts SET balance = balance - hold, updated_at = now() WHERE user_id = p_user;
    INSERT INTO credit_ledger (user_id, job_id, kind, amount, images)
        VALUES (p_user, j.id, 'reserve', -hold, p_sample_count);
    INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES (j.id, 1, 'created', 'pending', 0)
        RETURNING * INTO ev;
    events := ARRAY[ev];
    IF claim IS NULL THEN
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':1:created');
    ELSE
        INSERT INTO job_events (job_id, seq, type, status, attempt, detail)
            VALUES (j.id, 2, 'attempt_started', 'generating', 1, jsonb_build_object('worker', claim))
            RETURNING * INTO ev;
        events := events || ev;
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':2:attempt_started');
    END IF;
    job := j;
    IF claim IS NOT NULL THEN
        claimed := j;
        -- The job as its 'created' event (seq 1) left it: the attempt_started (seq 2) of this same transaction
        -- is what made it generating, attempt 1, leased and started.
        job.status := 'pending';
        job.attempt := 0;
        job.lease_owner := NULL;
        job.lease_expires_at := NULL;
        job.started_at := NULL;
        job.last_event_seq := 1;
    END IF;
    created := true;
END;
$$;

-- v4 is v5 answering the row as the call left it: claimed (generating) when it claimed, else as created.
CREATE OR REPLACE FUNCTION imagegen_create_job_v4(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    p_claim_owner text, p_lease_seconds double precision,
    p_priority integer, p_priority_rules integer[], p_start_within double precision,
    p_aging_seconds double precision, p_rate_limits integer[], p_rate_window_seconds double precision,
    OUT job generation_jobs, OUT created boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    made record;
BEGIN
    SELECT v.job, v.created, v.claimed INTO made FROM imagegen_create_job_v5(
        p_user, p_prompt, p_model, p_params, p_template_id, p_request_id, p_request_hash, p_price,
        p_sample_count, p_max_attempts, p_active_limit, p_new_user_credits, p_claim_owner, p_lease_seconds,
        p_priority, p_priority_rules, p_start_within, p_aging_seconds, p_rate_limits, p_rate_window_seconds) v;
    job := CASE WHEN (made.claimed).id IS NOT NULL THEN made.claimed ELSE made.job END;
    created := made.created;
END;
$$;

-- As imagegen_create_jobs_v2 (20261206000210) over v5: each item's claimed row and committed events too.
CREATE OR REPLACE FUNCTION imagegen_create_jobs_v3(p_items jsonb)
RETURNS TABLE (idx integer, job generation_jobs, created boolean, claimed generation_jobs, events job_events[],
               error_code text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    n    bigint;
    made record;
    v_detail text;
BEGIN
    FOR item, n IN SELECT e.value, e.ordinality FROM jsonb_array_elements(p_items) WITH ORDINALITY e ORDER BY 2 LOOP
        idx := n;
        error_code := NULL;
        error_message := NULL;
        error_detail := NULL;
        BEGIN
            SELECT v.job, v.created, v.claimed, v.events INTO made FROM imagegen_create_job_v5(
                (item ->> 'user')::uuid,
                item ->> 'prompt',
                item ->> 'model',
                item -> 'params',
                item ->> 'template_id',
                item ->> 'request_id',
                item ->> 'request_hash',
                (item ->> 'price')::integer,
                (item ->> 'sample_count')::integer,
                (item ->> 'max_attempts')::integer,
                (item ->> 'active_limit')::integer,
                (item ->> 'new_user_credits')::bigint,
                item ->> 'claim_owner',
                (item ->> 'lease_seconds')::double precision,
                (item ->> 'priority')::integer,
                CASE WHEN jsonb_typeof(item -> 'priority_rules') = 'array'
                     THEN ARRAY(SELECT jsonb_array_elements_text(item -> 'priority_rules'))::integer[] END,
                (item ->> 'start_within')::double precision,
                (item ->> 'aging_seconds')::double precision,
                CASE WHEN jsonb_typeof(item -> 'rate_limits') = 'array'
                     THEN ARRAY(SELECT jsonb_array_elements_text(item -> 'rate_limits'))::integer[] END,
                (item ->> 'rate_window_seconds')::double precision
            ) v;
            job := made.job;
            created := made.created;
            claimed := made.claimed;
            events := made.events;
        EXCEPTION WHEN SQLSTATE 'IG001' OR SQLSTATE 'IG002' OR SQLSTATE 'IG003' OR SQLSTATE 'IG005'
                       OR SQLSTATE 'IG006' THEN
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            job := NULL;
            created := false;
            claimed := NULL;
            events := '{}';
            error_code := SQLSTATE;
            error_message := SQLERRM;
            error_detail := nullif(v_detail, '');
        END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- On Supabase, keep the new functions away from app clients as 20261128000030 does for the others.
DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE ALL ON FUNCTION imagegen_create_job_v5(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                      integer, integer, bigint, text, double precision, integer,
                                                      integer[], double precision, double precision, integer[],
                                                      double precision)
            FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_job_v5(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                         integer, integer, bigint, text, double precision, integer,
                                                         integer[], double precision, double precision, integer[],
                                                         double precision)
            TO service_role;
        REVOKE ALL ON FUNCTION imagegen_create_jobs_v3(jsonb) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_jobs_v3(jsonb) TO service_role;
    END IF;
END
$supabase$;
