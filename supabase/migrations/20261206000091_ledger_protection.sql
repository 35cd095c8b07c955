-- balance = sum(ledger) for every account, against every role but the tables' owner.
--
-- 20261128000010 let any UPDATE or DELETE of the ledger through one trigger level down (pg_trigger_depth() > 1),
-- meaning the foreign-key actions; but a trigger of anyone's on any table runs at that depth as well, so a DELETE
-- from inside such a trigger went through. The two foreign-key actions are now recognised by what they are:
--   * PostgreSQL runs a referential action as the owner of the referencing table (credit_ledger), so current_user
--     is that owner; a trigger of another role's runs as its caller, never as the owner;
--   * a cascaded DELETE only ever removes rows whose credit account is already gone (balance and ledger leave
--     together), and the SET NULL of a deleted job only ever touches rows whose job is gone.
-- Anything else is refused as before, at any depth, whoever asks.
--
-- On Supabase, service_role kept every right on credit_accounts and credit_ledger (20261128000030 granted it ALL),
-- so it could UPDATE a balance without a ledger row, or add ledger rows without a balance. It now only reads
-- them: money moves through JobService, which connects as the tables' owner. Nor may it add triggers to any of our
-- tables (TRIGGER privilege): a trigger runs as whoever writes the row, and JobService writes them as the owner.

CREATE OR REPLACE FUNCTION imagegen_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ledger_owner name;
BEGIN
    IF pg_trigger_depth() > 1 AND TG_OP IN ('DELETE', 'UPDATE') THEN
        SELECT c.relowner::regrole::name INTO ledger_owner FROM pg_class c WHERE c.oid = TG_RELID;
        IF current_user = ledger_owner THEN
            IF TG_OP = 'DELETE'
               AND NOT EXISTS (SELECT 1 FROM credit_accounts a WHERE a.user_id = OLD.user_id) THEN
                RETURN OLD;
            END IF;
            IF TG_OP = 'UPDATE' AND NEW.job_id IS NULL AND OLD.job_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM generation_jobs j WHERE j.id = OLD.job_id)
               AND (NEW.id, NEW.user_id, NEW.kind, NEW.amount, NEW.images, NEW.reason, NEW.at)
                   IS NOT DISTINCT FROM (OLD.id, OLD.user_id, OLD.kind, OLD.amount, OLD.images, OLD.reason, OLD.at) THEN
                RETURN NEW;
            END IF;
        END IF;
    END IF;
    RAISE EXCEPTION 'credit_ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'IG004', HINT = 'correct a balance with a new grant row instead';
END;
$$;

DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON credit_accounts, credit_ledger
            FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON credit_accounts, credit_ledger TO service_role;
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM service_role', pg_get_serial_sequence('credit_ledger', 'id'));
        REVOKE TRIGGER ON generation_jobs, job_events, templates FROM PUBLIC, anon, authenticated, service_role;
    END IF;
END
$supabase$;
