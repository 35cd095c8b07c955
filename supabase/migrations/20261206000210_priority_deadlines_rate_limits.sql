-- Priorities, start deadlines and per-user rate limits on CreateJob (issue 21, items 2 and 4).
--
-- Priority. A job has a priority, 0 (lowest) to 9 (highest), default 5. Dispatch takes the job with the highest
-- *effective* priority first, then the oldest, where a pending job's effective priority grows by one step for every
-- JOB_PRIORITY_AGING_SECONDS (T) it has waited since it was created:
--     effective(now) = priority + (now - created_at) / T
-- Job A goes before job B iff  priority_A + (now - created_A)/T > priority_B + (now - created_B)/T,
-- that is iff  created_A - priority_A*T < created_B - priority_B*T: the order does not depend on now. So each job
-- gets a fixed dispatch key, dispatch_at = created_at - priority * T (set when the job is created, with the T of
-- the replica that creates it), and the claim takes the smallest dispatch_at first: an index scan, no sort.
-- The bound (aging): a job of priority p is never passed by a job created more than (9 - p) * T after it; it waits
-- at most for the jobs created before created_at + (9 - p) * T (a finite set: rate limits and the active-job cap
-- bound how many a user makes), so nothing starves. With T = 60 s a priority-0 job is, after 9 minutes, ahead of
-- every job created since, whatever its priority.
-- A job sent back to pending (a retry, a hand-back, a lost lease) keeps its key: when due again it goes before the
-- jobs created after it.
--
-- Claim at create (imagegen_create_job_v4 with p_claim_owner): a replica with room claims the job it creates in the
-- same transaction, unless a due pending job with a dispatch key before the new job's is waiting: the new job
-- must not jump the queue, so it is then inserted pending (NOTIFY 'created') and the claimers take the queue in
-- order. The check reads the head of the queue as the claim does (one index scan of generation_jobs_dispatch).
--
-- Start deadlines. A job may carry start_deadline (now() + the request's start_within, on the database's clock).
-- A job that has not started by then (attempt = 0: no attempt was ever claimed) ends 'expired', a new terminal
-- state: its reservation is released in full and nothing captured (imagegen_advance settles 'expired' as every
-- terminal state: capture = delivered images * price = 0), an 'expired' event is written and NOTIFYed, so
-- watchers end. The claimer never takes a job past its deadline that has not started; imagegen_expire_jobs (run
-- by every replica's sweep, batched, SKIP LOCKED) ends them. A job that has started once and is pending again
-- between attempts (a retry) has started: it no longer expires.
--
-- Rate limits. imagegen_create_job_v4 refuses (IG005) a create past p_rate_limits jobs created by the user within
-- the last p_rate_window_seconds (a sliding window, counted in the database, so across replicas), after the
-- idempotency check: a replay of a request_id is answered and counts nothing. DETAIL carries a JSON object
-- {limit, window_seconds, retry_after} (retry_after: seconds until the oldest job that counts leaves the window).
--
-- Priority rules (p_priority_rules: {default, max, premium default, premium max}) are applied here too, under the
-- account lock, since only the account knows whether the user is premium: a priority above the account's max is
-- refused (IG006, DETAIL {max}).
--
-- imagegen_create_job_v3 now calls v4 (priority default 5, T = 60 s, no deadline, no rate limit), so a replica of
-- the previous version keeps working; imagegen_create_jobs (v3 per item) is unchanged. imagegen_create_jobs_v2 is
-- imagegen_create_jobs over v4, with the refusal's DETAIL in a column of its own.

ALTER TABLE generation_jobs
    ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 0 AND 9),
    -- now() in a column default is evaluated once here (no table rewrite) for the rows that exist, and per insert
    -- afterwards; every create function sets it.
    ADD COLUMN IF NOT EXISTS dispatch_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS start_deadline timestamptz;

COMMENT ON COLUMN generation_jobs.priority IS '0 (lowest) to 9 (highest); default 5.';
COMMENT ON COLUMN generation_jobs.dispatch_at IS
    'The dispatch key: created_at - priority * JOB_PRIORITY_AGING_SECONDS; the claim takes the smallest first.';
COMMENT ON COLUMN generation_jobs.start_deadline IS
    'A job not started (attempt 0) by then ends expired; NULL: no deadline.';

-- Active jobs of before this migration: priority 5, aged as with the default T of 60 s.
UPDATE generation_jobs SET dispatch_at = created_at - interval '300 seconds'
    WHERE status IN ('pending', 'generating');

-- The new terminal state. NOT VALID then VALIDATE: the check of the existing rows does not block writes.
ALTER TABLE generation_jobs DROP CONSTRAINT IF EXISTS generation_jobs_status_check;
ALTER TABLE generation_jobs ADD CONSTRAINT generation_jobs_status_check
    CHECK (status IN ('pending', 'generating', 'completed', 'failed', 'cancelled', 'expired')) NOT VALID;
ALTER TABLE generation_jobs VALIDATE CONSTRAINT generation_jobs_status_check;

-- The claim: pending jobs in dispatch order. It replaces generation_jobs_due (next_attempt_at), which nothing
-- else reads: a pending job not yet due (a retry waiting out its delay) is skipped by the scan's filter.
-- Plans (EXPLAIN with 27,000 jobs, 20,250 of them pending):
--   claim:  Limit -> LockRows -> Index Scan using generation_jobs_dispatch on generation_jobs
--               Filter: (status = 'pending') AND (next_attempt_at <= now()) AND ((start_deadline IS NULL) OR ...)
--   expiry: Limit -> LockRows -> Index Scan using generation_jobs_start_deadline
--               Index Cond: (start_deadline IS NOT NULL) AND (start_deadline <= now())
--   rate limit: Limit -> Index Only Scan using generation_jobs_user_created
--               Index Cond: (user_id = $1) AND (created_at > (now() - $window))
CREATE INDEX IF NOT EXISTS generation_jobs_dispatch ON generation_jobs (dispatch_at) WHERE status = 'pending';
DROP INDEX IF EXISTS generation_jobs_due;
-- The expiry sweep: pending jobs never started that carry a deadline.
CREATE INDEX IF NOT EXISTS generation_jobs_start_deadline ON generation_jobs (start_deadline)
    WHERE status = 'pending' AND attempt = 0 AND start_deadline IS NOT NULL;

-- As in 20261206000070, with 'expired' among the terminal states that settle the reservation.
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

    IF status_to IN ('completed', 'failed', 'cancelled', 'expired') THEN
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

-- As in 20261206000070, except the order (dispatch_at: priority with aging, then oldest) and that a job past its
-- start deadline that never started is not claimed (the sweep expires it).
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
              AND (start_deadline IS NULL OR attempt > 0 OR start_deadline > now())
            ORDER BY dispatch_at
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

-- Ends up to p_limit pending jobs that never started and are past their start deadline: status 'expired', the
-- reservation released (all of it; nothing delivered, nothing captured), an 'expired' event and its NOTIFY, each
-- through imagegen_advance. SKIP LOCKED: replicas sweeping at once take different jobs, and a job a claimer holds
-- is left to it (the claim's own filter then refuses it). released: what each job held before, for metrics.
CREATE OR REPLACE FUNCTION imagegen_expire_jobs(p_limit integer)
RETURNS TABLE (job generation_jobs, released bigint)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    j generation_jobs;
BEGIN
    FOR r IN
        SELECT g.id, g.credits_reserved FROM generation_jobs g
        WHERE g.status = 'pending' AND g.attempt = 0 AND g.start_deadline IS NOT NULL AND g.start_deadline <= now()
        ORDER BY g.start_deadline
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    LOOP
        j := imagegen_advance(
            p_id => r.id, p_attempt => 0, p_from => ARRAY['pending'], p_event => 'expired', p_to => 'expired',
            p_message => 'The job did not start before its start deadline.',
            p_error_code => 'START_DEADLINE_EXCEEDED');
        IF j.id IS NOT NULL THEN
            job := j;
            released := r.credits_reserved;
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

-- imagegen_create_job_v3 with priority, start deadline and rate limit (see the top of this file).
--   p_priority          NULL: the account's default (p_priority_rules[1], or [3] for premium; 5 without rules)
--   p_priority_rules    {default, max, premium default, premium max}; NULL: any priority 0-9
--   p_start_within      seconds from now until the start deadline; NULL: none
--   p_aging_seconds     T; NULL: 60
--   p_rate_limits       {jobs per window, premium jobs per window}, 0 = unlimited; NULL: no limit
--   p_rate_window_seconds  the window; NULL: 60
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
    INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES (j.id, 1, 'created', 'pending', 0);
    IF claim IS NULL THEN
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':1:created');
    ELSE
        INSERT INTO job_events (job_id, seq, type, status, attempt, detail)
            VALUES (j.id, 2, 'attempt_started', 'generating', 1, jsonb_build_object('worker', claim));
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':2:attempt_started');
    END IF;
    job := j;
    created := true;
END;
$$;

-- v3 is v4 with the defaults: priority 5, T = 60 s, no deadline, no rate limit (a replica of the previous version).
CREATE OR REPLACE FUNCTION imagegen_create_job_v3(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    p_claim_owner text, p_lease_seconds double precision,
    OUT job generation_jobs, OUT created boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    made record;
BEGIN
    SELECT v.job, v.created INTO made FROM imagegen_create_job_v4(
        p_user, p_prompt, p_model, p_params, p_template_id, p_request_id, p_request_hash, p_price,
        p_sample_count, p_max_attempts, p_active_limit, p_new_user_credits, p_claim_owner, p_lease_seconds,
        NULL, NULL, NULL, NULL, NULL, NULL) v;
    job := made.job;
    created := made.created;
END;
$$;

-- As imagegen_create_jobs (20261130000060) over v4: each item may also carry priority, priority_rules,
-- start_within, aging_seconds, rate_limits and rate_window_seconds; a refusal's DETAIL comes in error_detail.
CREATE OR REPLACE FUNCTION imagegen_create_jobs_v2(p_items jsonb)
RETURNS TABLE (idx integer, job generation_jobs, created boolean, error_code text, error_message text,
               error_detail text)
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
            SELECT v.job, v.created INTO made FROM imagegen_create_job_v4(
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
        EXCEPTION WHEN SQLSTATE 'IG001' OR SQLSTATE 'IG002' OR SQLSTATE 'IG003' OR SQLSTATE 'IG005'
                       OR SQLSTATE 'IG006' THEN
            GET STACKED DIAGNOSTICS v_detail = PG_EXCEPTION_DETAIL;
            job := NULL;
            created := false;
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
        REVOKE ALL ON FUNCTION imagegen_create_job_v4(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                      integer, integer, bigint, text, double precision, integer,
                                                      integer[], double precision, double precision, integer[],
                                                      double precision)
            FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_job_v4(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                         integer, integer, bigint, text, double precision, integer,
                                                         integer[], double precision, double precision, integer[],
                                                         double precision)
            TO service_role;
        REVOKE ALL ON FUNCTION imagegen_create_jobs_v2(jsonb) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_jobs_v2(jsonb) TO service_role;
        REVOKE ALL ON FUNCTION imagegen_expire_jobs(integer) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_expire_jobs(integer) TO service_role;
    END IF;
END
$supabase$;
