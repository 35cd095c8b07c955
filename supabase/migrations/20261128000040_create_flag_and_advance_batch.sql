-- Two round trips fewer per job, same semantics:
--   * imagegen_create_job_v2 is imagegen_create_job that also says whether this call made the job (created)
--     or returned the one an earlier call with the same request_id made (an idempotent replay), so that the
--     caller's metrics need no second query. imagegen_create_job keeps its signature and now calls it.
--   * imagegen_advance_batch applies several events of one attempt in one transaction (one commit, one fsync),
--     each exactly as imagegen_advance would, in order, with its own job_events row, seq and NOTIFY.

CREATE OR REPLACE FUNCTION imagegen_create_job_v2(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    OUT job generation_jobs, OUT created boolean
)
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
            job := j;
            created := false;
            RETURN;
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
    job := j;
    created := true;
END;
$$;

CREATE OR REPLACE FUNCTION imagegen_create_job(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint
) RETURNS generation_jobs
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT v.job FROM imagegen_create_job_v2(
        p_user, p_prompt, p_model, p_params, p_template_id, p_request_id, p_request_hash, p_price,
        p_sample_count, p_max_attempts, p_active_limit, p_new_user_credits) v);
END;
$$;

-- Applies p_events (a JSON array of objects with the keys event, and optionally to, message, error_code, image,
-- filtered, filtered_reasons, retry_delay, cancel_requested, count_failure: imagegen_advance's parameters without
-- the p_) one after another, each through imagegen_advance with the same fence. Returns the job after each event
-- that was applied, in order; it stops at the first event the fence refuses, so fewer rows than events means the
-- caller no longer holds the job (the events before it stay applied).
CREATE OR REPLACE FUNCTION imagegen_advance_batch(p_id uuid, p_attempt integer, p_from text[], p_events jsonb)
RETURNS SETOF generation_jobs
LANGUAGE plpgsql AS $$
DECLARE
    e jsonb;
    j generation_jobs;
BEGIN
    FOR e IN SELECT value FROM jsonb_array_elements(p_events) LOOP
        j := imagegen_advance(
            p_id => p_id,
            p_attempt => p_attempt,
            p_from => p_from,
            p_event => e ->> 'event',
            p_to => e ->> 'to',
            p_message => e ->> 'message',
            p_error_code => e ->> 'error_code',
            p_image => nullif(e -> 'image', 'null'::jsonb),
            p_filtered => (e ->> 'filtered')::integer,
            p_filtered_reasons => CASE WHEN jsonb_typeof(e -> 'filtered_reasons') = 'array'
                                       THEN ARRAY(SELECT jsonb_array_elements_text(e -> 'filtered_reasons'))
                                  END,
            p_retry_delay => (e ->> 'retry_delay')::double precision,
            p_cancel_requested => (e ->> 'cancel_requested')::boolean,
            p_count_failure => coalesce((e ->> 'count_failure')::boolean, false)
        );
        IF j.id IS NULL THEN
            RETURN;
        END IF;
        RETURN NEXT j;
    END LOOP;
END;
$$;

-- On Supabase, keep the new functions away from app clients as 20261128000030 does for the others.
DO $supabase$
BEGIN
    -- The same guard as 20261128000030: only a Supabase database (auth schema and its API roles).
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE ALL ON FUNCTION imagegen_create_job_v2(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                      integer, integer, bigint) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_job_v2(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                         integer, integer, bigint) TO service_role;
        REVOKE ALL ON FUNCTION imagegen_advance_batch(uuid, integer, text[], jsonb) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_advance_batch(uuid, integer, text[], jsonb) TO service_role;
    END IF;
END
$supabase$;
