-- GrantCredits gets an idempotency key, as CreateJob has: a grant whose COMMIT happened but whose answer was lost
-- (the connection dropped) is retried by the client with the same request_id, and the retry must not grant twice.
--
-- credit_grant_requests remembers each keyed grant: who, how much, why, and the account as that grant left it.
-- The key is global, not per user (GrantCredits is a service-role call and the caller names the user), so the same
-- request_id for another user, amount, reason or premium flag is a reused key: IG003, as for CreateJob. A replay
-- answers the first grant's result (balance and premium flag just after it) and writes nothing.
--
-- imagegen_grant_credits (5 arguments) stays as it is for replicas still running the previous release during a
-- rolling deploy; this release calls imagegen_grant_credits_v2.

CREATE TABLE IF NOT EXISTS credit_grant_requests (
    request_id text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 64),
    -- The account goes, its grant records go with it (the ledger's rows do too on Supabase).
    user_id    uuid NOT NULL REFERENCES credit_accounts (user_id) ON DELETE CASCADE,
    amount     bigint NOT NULL,
    reason     text NOT NULL,
    premium    boolean,
    -- The account just after the grant: what a replay answers.
    balance    bigint,
    is_premium boolean,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS credit_grant_requests_user ON credit_grant_requests (user_id);

CREATE OR REPLACE FUNCTION imagegen_grant_credits_v2(
    p_user uuid, p_amount bigint, p_reason text, p_premium boolean, p_new_user_credits bigint, p_request_id text,
    OUT balance bigint, OUT is_premium boolean, OUT granted boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    acct credit_accounts;
    earlier credit_grant_requests;
BEGIN
    PERFORM imagegen_ensure_account(p_user, p_new_user_credits);
    IF p_request_id IS NOT NULL THEN
        -- Claim the key first: a concurrent call with the same key waits here on the primary key until this
        -- transaction ends, then finds the row and replays (or refuses) instead of granting a second time.
        INSERT INTO credit_grant_requests (request_id, user_id, amount, reason, premium)
            VALUES (p_request_id, p_user, p_amount, p_reason, p_premium)
            ON CONFLICT (request_id) DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO earlier FROM credit_grant_requests g WHERE g.request_id = p_request_id;
            IF (earlier.user_id, earlier.amount, earlier.reason, earlier.premium)
               IS DISTINCT FROM (p_user, p_amount, p_reason, p_premium) THEN
                RAISE EXCEPTION 'request_id % was already used for a different grant', p_request_id
                    USING ERRCODE = 'IG003';
            END IF;
            balance := earlier.balance;
            is_premium := earlier.is_premium;
            granted := false;
            RETURN;
        END IF;
    END IF;
    -- As imagegen_grant_credits (20261128000003).
    UPDATE credit_accounts
        SET balance = credit_accounts.balance + p_amount, is_premium = coalesce(p_premium, credit_accounts.is_premium),
            updated_at = now()
        WHERE user_id = p_user
        RETURNING * INTO acct;
    INSERT INTO credit_ledger (user_id, kind, amount, reason) VALUES (p_user, 'grant', p_amount, p_reason);
    IF p_request_id IS NOT NULL THEN
        UPDATE credit_grant_requests g SET balance = acct.balance, is_premium = acct.is_premium
            WHERE g.request_id = p_request_id;
    END IF;
    balance := acct.balance;
    is_premium := acct.is_premium;
    granted := true;
END;
$$;

-- On Supabase, as 20261128000030 does for our other tables and functions: no app client reads or calls any of it,
-- and service_role only reads the table (grants go through JobService, see 20261206000091).
DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        ALTER TABLE credit_grant_requests ENABLE ROW LEVEL SECURITY;
        REVOKE ALL ON credit_grant_requests FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON credit_grant_requests TO service_role;
        REVOKE ALL ON FUNCTION imagegen_grant_credits_v2(uuid, bigint, text, boolean, bigint, text)
            FROM PUBLIC, anon, authenticated;
        GRANT EXECUTE ON FUNCTION imagegen_grant_credits_v2(uuid, bigint, text, boolean, bigint, text)
            TO service_role;
    END IF;
END
$supabase$;
