-- Group commit of CreateJob: imagegen_create_jobs makes several jobs in one call and one transaction (one
-- round trip, one commit and fsync for all of them), each exactly as imagegen_create_job_v2 would.
--
-- Each item runs in its own exception block, so an item refused for one of the create rules (IG001 credits,
-- IG002 active jobs, IG003 request_id reuse) is rolled back alone and answered with its SQLSTATE and message,
-- while the others commit. Any other error aborts the whole call: nothing of it commits.
--
-- Items are made in array order. Callers send them sorted by user_id, so that every caller takes the account
-- row locks in the same order and two concurrent calls can never wait for each other in a cycle; one user's
-- items keep the order they were asked in (the earlier one gets the credits first).
--
-- Each item is a JSON object with imagegen_create_job_v2's parameters without the p_ (user, prompt, model,
-- params, template_id, request_id, request_hash, price, sample_count, max_attempts, active_limit,
-- new_user_credits). One row comes back per item, in order (idx from 1): the job and whether this call
-- made it, or error_code and error_message.

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
            SELECT v.job, v.created INTO made FROM imagegen_create_job_v2(
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
                (item ->> 'new_user_credits')::bigint
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
        REVOKE ALL ON FUNCTION imagegen_create_jobs(jsonb) FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_create_jobs(jsonb) TO service_role;
    END IF;
END
$supabase$;
