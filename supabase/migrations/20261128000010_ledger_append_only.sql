-- The credit ledger is append-only: balance == sum(ledger) per user is only provable if no row ever
-- changes or disappears. The functions of 20261128000003 only ever INSERT; this makes the database
-- refuse anything else, whoever asks (a hand-written fix, a buggy migration, a compromised caller).
--
-- Two writes stay allowed because they keep the invariant and come from foreign-key actions (which run
-- one trigger level down, pg_trigger_depth() > 1), never from a statement on the ledger itself:
--   * deleting a user's credit account takes its ledger rows with it (the Supabase-only migration makes
--     that cascade, so deleting a user in Supabase Auth removes their data);
--   * deleting a job detaches its rows (job_id set to NULL, everything else unchanged).

CREATE OR REPLACE FUNCTION imagegen_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        IF TG_OP = 'UPDATE' AND NEW.job_id IS NULL
           AND (NEW.id, NEW.user_id, NEW.kind, NEW.amount, NEW.images, NEW.reason, NEW.at)
               IS NOT DISTINCT FROM (OLD.id, OLD.user_id, OLD.kind, OLD.amount, OLD.images, OLD.reason, OLD.at) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'credit_ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'IG004', HINT = 'correct a balance with a new grant row instead';
END;
$$;

DROP TRIGGER IF EXISTS credit_ledger_append_only ON credit_ledger;
CREATE TRIGGER credit_ledger_append_only
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION imagegen_ledger_append_only();

DROP TRIGGER IF EXISTS credit_ledger_no_truncate ON credit_ledger;
CREATE TRIGGER credit_ledger_no_truncate
    BEFORE TRUNCATE ON credit_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION imagegen_ledger_append_only();
