-- A job created and claimed in one transaction, by the replica that creates it when it has room to run it: no
-- NOTIFY to wait for, no claim round trip of its own (measured: 2.4-5 ms between a job's creation and its claim
-- when one job ran at a time).
--
-- imagegen_create_job_v3 is imagegen_create_job_v2 with two more parameters. With p_claim_owner NULL it is
-- exactly v2. Otherwise a job this call makes is inserted already claimed by p_claim_owner, as
-- imagegen_claim_jobs would have claimed it: status 'generating', attempt 1, a lease of p_lease_seconds, and its
-- events 'created' (seq 1) then 'attempt_started' (seq 2). It sends one NOTIFY, for seq 2 ('attempt_started'),
-- so that no replica's claimer wakes for a job that is not pending; a watcher reads both events from it.
-- An idempotent replay claims nothing: it returns the earlier job as it is.
--
-- imagegen_create_job_v2 now calls v3 (one body for both), and imagegen_create_jobs passes each item's
-- claim_owner and lease_seconds (absent: NULL, the old behaviour).

CREATE OR REPLACE FUNCTION imagegen_create_job_v3(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    p_claim_owner text, p_lease_seconds double precision,
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

    IF p_claim_owner IS NULL THEN
        INSERT INTO generation_jobs (user_id, template_id, prompt, model, params, request_id, request_hash,
                                     max_attempts, credits_reserved, price_per_image, last_event_seq)
            VALUES (p_user, p_template_id, p_prompt, p_model, p_params, p_request_id, p_request_hash,
                    p_max_attempts, hold, p_price, 1)
            RETURNING * INTO j;
    ELSE
        INSERT INTO generation_jobs (user_id, template_id, prompt, model, params, request_id, request_hash,
                                     max_attempts, credits_reserved, price_per_image, last_event_seq,
                                     status, attempt, lease_owner, lease_expires_at, started_at)
            VALUES (p_user, p_template_id, p_prompt, p_model, p_params, p_request_id, p_request_hash,
                    p_max_attempts, hold, p_price, 2,
                    'generating', 1, p_claim_owner, now() + make_interval(secs => p_lease_seconds), now())
            RETURNING * INTO j;
    END IF;
    UPDATE credit_accounts SET balance = balance - hold, updated_at = now() WHERE user_id = p_user;
    INSERT INTO credit_ledger (user_id, job_id, kind, amount, images)
        VALUES (p_user, j.id, 'reserve', -hold, p_sample_count);
    INSERT INTO job_events (job_id, seq, type, status, attempt) VALUES (j.id, 1, 'created', 'pending', 0);
    IF p_claim_owner IS NULL THEN
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':1:created');
    ELSE
        INSERT INTO job_events (job_id, seq, type, status, attempt, detail)
            VALUES (j.id, 2, 'attempt_started', 'generating', 1, jsonb_build_object('worker', p_claim_owner));
        PERFORM pg_notify('imagegen_jobs', j.id::text || ':2:attempt_started');
    END IF;
    job := j;
    created := true;
END;
$$;

CREATE OR REPLACE FUNCTION imagegen_create_job_v2(
    p_user uuid, p_prompt text, p_model text, p_params jsonb, p_template_id text,
    p_request_id text, p_request_hash text, p_price integer, p_sample_count integer,
    p_max_attempts integer, p_active_limit integer, p_new_user_credits bigint,
    OUT job generation_jobs, OUT created boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    made record;
BEGIN
    SELECT v.job, v.created INTO made FROM imagegen_create_job_v3(
        p_user, p_prompt, p_model, p_params, p_template_id, p_request_id, p_request_hash, p_price,
        p_sample_count, p_max_attempts, p_active_limit, p_new_user_credits, NULL, NULL) v;
    job := made.job;
    created := made.created;
END;
$$;

-- As in 20261130000050 (each item in its own exception block; callers sort the items by user), with each item's
-- claim_owner and lease_seconds passed on.
CREATE OR REPLACE FUNCTION imagegen_create_jobs(p_items jsonb)
RETURNS TABLE (idx integer, job generation_jobs, created boolean, error_code text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    n    bigint;
    made record;
BEGIN
    FOR item, n IN SELECT e.value, e.ordinality FROM jsonb_array_elements(p_items) WITH ORDINALITY e ORDER BY 2 LOOP
        idx := n;
        error_code := NULL;
        error_message := NULL;
        BEGIN
            SELECT v.job, v.created INTO made FROM imagegen_create_job_v3(
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
                (item ->> 'lease_seconds')::double precision
            ) v;
            job := made.job;
            created := made.created;
        EXCEPTION WHEN SQLSTATE 'IG001' OR SQLSTATE 'IG002' OR SQLSTATE 'IG003' THEN
            job := NULL;
            created := false;
            error_code := SQLSTATE;
            error_message := SQLERRM;
        END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- On Supabase, keep the new function away from app clients as 20261128000030 does for the others.
DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE ALL ON FUNCTION imagegen_create_job_v3(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                      integer, integer, bigint, text, double precision)
            FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_job_v3(uuid, text, text, jsonb, text, text, text, integer, integer,
                                                         integer, integer, bigint, text, double precision)
            TO service_role;
    END IF;
END
$supabase$;
