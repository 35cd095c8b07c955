-- Every state change of a job is one function call: one round trip, one transaction, and the rules
-- (fencing, credit settlement, event history, NOTIFY) live in one place for every replica.

-- Custom SQLSTATEs raised here (class IG): IG001 insufficient credits, IG002 too many active jobs,
-- IG003 request_id reused with a different request.

-- A user's account, made on first sight with a welcome grant (recorded in the ledger like any grant).
CREATE OR REPLACE FUNCTION imagegen_ensure_account(p_user uuid, p_new_user_credits bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO credit_accounts (user_id, balance) VALUES (p_user, p_new_user_credits)
        ON CONFLICT (user_id) DO NOTHING;
    IF FOUND AND p_new_user_credits > 0 THEN
        INSERT INTO credit_ledger (user_id, kind, amount, reason)
            VALUES (p_user, 'grant', p_new_user_credits, 'new user');
    END IF;
END;
$$;

-- Adds credits (and optionally sets the premium flag); returns the account after the grant.
CREATE OR REPLACE FUNCTION imagegen_grant_credits(
    p_user uuid, p_amount bigint, p_reason text, p_premium boolean, p_new_user_credits bigint
) RETURNS credit_accounts
LANGUAGE plpgsql AS $$
DECLARE
    acct credit_accounts;
BEGIN
    PERFORM imagegen_ensure_account(p_user, p_new_user_credits);
    UPDATE credit_accounts
        SET balance = balance + p_amount, is_premium = coalesce(p_premium, is_premium), updated_at = now()
        WHERE user_id = p_user
        RETURNING * INTO acct;
    INSERT INTO credit_ledger (user_id, kind, amount, reason) VALUES (p_user, 'grant', p_amount, p_reason);
    RETURN acct;
END;
$$;

CREATE OR REPLACE FUNCTION imagegen_create_job(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint
) RETURNS generation_jobs
LANGUAGE plpgsql AS $$
DECLARE
    acct   credit_accounts;
    j      generation_jobs;
    active integer;
    hold   bigint;
BEGIN
    PERFORM imagegen_ensure_account(p_user, p_new_user_credits);
    -- The account row lock serialises one user's creates: the idempotency check, the active-job cap
    -- and the balance check below cannot race each other.
    SELECT * INTO acct FROM credit_accounts WHERE user_id = p_user FOR UPDATE;

    IF p_request_id IS NOT NULL THEN
        SELECT * INTO j FROM generation_jobs WHERE user_id = p_user AND request_id = p_request_id;
        IF FOUND THEN
            IF j.request_hash IS DISTINCT FROM p_request_hash THEN
                RAISE EXCEPTION 'request_id % was already used for a different request', p_request_id
                    USING ERRCODE = 'IG003';
            END IF;
            RETURN j;
        END IF;
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

    INSERT INTO generation_jobs (user_id, template_id, prompt, model, params, request_id, request_hash,
                                 max_attempts, credits_reserved, price_per_image, last_event_seq)
        VALUES (p_user, p_template_id, p_prompt, p_model, p_params, p_request_id, p_request_hash,
                p_max_attempts, hold, p_price, 1)
        RETURNING * INTO j;
    UPDATE credit_accounts SET balance = balance - hold, updated_at = now() WHERE user_id = p_user;
    INSERT INTO credit_ledger (user_id, job_id, kind, amount, images)
        VALUES (p_user, j.id, 'reserve', -hold, p_sample_count);
    INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES (j.id, 1, 'created', 'pending', 0);
    PERFORM pg_notify('imagegen_jobs', j.id::text || ':1:created');
    RETURN j;
END;
$$;

-- Moves a job forward by one event. Returns the job after the change, or NULL when the caller does
-- not hold the job any more (status not in p_from, or another attempt owns it): the fence that
-- keeps a replica that lost its lease from changing anything.
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
        j.images := j.images || jsonb_build_array(p_image);
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

    IF status_to IN ('completed', 'failed', 'cancelled') THEN
        -- Settle the reservation exactly once, with the terminal state: release all of it, capture
        -- what was delivered. The unique (job_id, kind) index refuses a second settlement outright.
        IF status_to = 'completed' THEN
            charge := least(jsonb_array_length(j.images)::bigint * j.price_per_image, j.credits_reserved);
        END IF;
        released := j.credits_reserved;
        UPDATE credit_accounts SET balance = balance + released - charge, updated_at = now()
            WHERE user_id = j.user_id;
        INSERT INTO credit_ledger (user_id, job_id, kind, amount, images)
            VALUES (j.user_id, j.id, 'release', released, 0),
                   (j.user_id, j.id, 'capture', -charge,
                    CASE WHEN status_to = 'completed' THEN jsonb_array_length(j.images) ELSE 0 END);
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

-- Claims up to p_limit due jobs for p_owner: PENDING -> GENERATING with a fresh attempt number and a
-- lease. SKIP LOCKED lets every replica claim at once without waiting on each other.
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
                images = '[]', result_urls = '{}', result_paths = '{}', filtered_count = 0,
                filtered_reasons = '{}', last_event_seq = g.last_event_seq + 1
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
