-- Signed webhooks (issue 21 item 1): a job's webhook, and an outbox of deliveries filled in the transaction
-- that writes each event.
--
-- How the webhook reaches the row without touching the create functions: CreateJob puts it in the params it
-- passes them, under the key "webhook" ({"url": ..., "events": [...]}). A BEFORE INSERT trigger on
-- generation_jobs moves it out of params into two columns of its own, in the very INSERT that creates the job,
-- so it is as atomic as the job itself, on every create path (imagegen_create_job_v2/v3 and the group commit's
-- imagegen_create_jobs, which all insert p_params as params), and params keeps only generation parameters.
--
-- The outbox: an AFTER INSERT trigger on job_events adds a webhook_deliveries row when the job has a webhook
-- subscribed to the event's type. It runs inside the statement that writes the event (imagegen_advance, the
-- claim, the create), so the delivery commits if and only if the event does: no event is lost between the
-- commit and a send, and no delivery is made for an event that rolled back. The row keeps a snapshot of the job
-- as the event left it (to_jsonb of the row), so every delivery, retried or late, carries the job as it was
-- when the event happened.

ALTER TABLE generation_jobs
    ADD COLUMN IF NOT EXISTS webhook_url text,
    -- Event type names ('job.completed', ...) the webhook is sent for.
    ADD COLUMN IF NOT EXISTS webhook_events text[] NOT NULL DEFAULT '{}';

CREATE OR REPLACE FUNCTION imagegen_take_webhook() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hook jsonb := NEW.params -> 'webhook';
BEGIN
    IF hook IS NOT NULL THEN
        NEW.params := NEW.params - 'webhook';
        IF jsonb_typeof(hook) = 'object' AND coalesce(hook ->> 'url', '') <> '' THEN
            NEW.webhook_url := hook ->> 'url';
            NEW.webhook_events := ARRAY(SELECT jsonb_array_elements_text(coalesce(hook -> 'events', '[]'::jsonb)));
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS generation_jobs_take_webhook ON generation_jobs;
CREATE TRIGGER generation_jobs_take_webhook BEFORE INSERT ON generation_jobs
    FOR EACH ROW EXECUTE FUNCTION imagegen_take_webhook();

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    -- Sent as `webhook-id` (as msg_<hex>): the same for every attempt, the receiver's idempotency key.
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id           uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    -- The job_events seq of the event: a job's deliveries go out in this order.
    seq              bigint NOT NULL,
    type             text NOT NULL,
    url              text NOT NULL,
    -- The job row as the event left it (to_jsonb(generation_jobs)).
    job              jsonb NOT NULL,
    event_at         timestamptz NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    -- Sends started so far (incremented by the claim: the fence of the send's result).
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz,
    UNIQUE (job_id, seq)
);
-- The sender's claim: due pending deliveries ...
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
-- ... whose job has no earlier delivery still pending (in order per job).
CREATE INDEX IF NOT EXISTS webhook_deliveries_job_pending ON webhook_deliveries (job_id, seq) WHERE state = 'pending';

-- One row per send that ended (a send cut short by the death of its replica leaves none; its lease runs out and
-- another replica sends again).
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id      uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    at               timestamptz NOT NULL DEFAULT now(),
    duration_seconds double precision NOT NULL,
    -- The receiver's HTTP status; NULL when there was no answer (refused, timed out, forbidden address).
    http_status      integer,
    error            text NOT NULL DEFAULT '',
    worker           text NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- One statement: a jobs row read by primary key, and nothing else for the events of jobs without a webhook (nearly
-- all of them). Measured on this project's shared 2-core machine, inserting 20,000 events of the types the WHEN
-- clause lets through: about 10-20 us more per event than without the trigger (noisy figures); other event types
-- do not call it at all.
CREATE OR REPLACE FUNCTION imagegen_enqueue_webhook() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (job_id, seq, type, url, job, event_at)
        SELECT g.id, NEW.seq, k.kind, g.webhook_url, to_jsonb(g), NEW.at
        FROM generation_jobs g
        CROSS JOIN LATERAL (SELECT CASE NEW.type
            WHEN 'attempt_started' THEN 'job.started'
            WHEN 'image_stored' THEN 'job.image_stored'
            WHEN 'completed' THEN 'job.completed'
            WHEN 'failed' THEN 'job.failed'
            WHEN 'cancelled' THEN 'job.cancelled'
            WHEN 'expired' THEN 'job.expired'
        END AS kind) k
        WHERE g.id = NEW.job_id AND g.webhook_url IS NOT NULL AND k.kind = ANY (g.webhook_events)
        ON CONFLICT (job_id, seq) DO NOTHING;
    -- No NOTIFY of its own: the event's NOTIFY on imagegen_jobs (same transaction) wakes every replica's sender.
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS job_events_enqueue_webhook ON job_events;
CREATE TRIGGER job_events_enqueue_webhook AFTER INSERT ON job_events
    FOR EACH ROW WHEN (NEW.type IN ('attempt_started', 'image_stored', 'completed', 'failed', 'cancelled', 'expired'))
    EXECUTE FUNCTION imagegen_enqueue_webhook();

DO $supabase$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth')
       AND (SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')) = 3 THEN
        -- Deliveries hold the webhook URL (which may carry the receiver's own token) and job snapshots: only
        -- JobService (the owner) writes them, and only it and service_role read them (ListWebhookDeliveries is
        -- the users' way in). service_role reads only, as for the job tables (20261206000092): a row it could
        -- insert would be sent by JobService without CreateJob's checks of the URL.
        ALTER TABLE webhook_deliveries ENABLE ROW LEVEL SECURITY;
        ALTER TABLE webhook_attempts ENABLE ROW LEVEL SECURITY;
        REVOKE ALL ON webhook_deliveries, webhook_attempts FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON webhook_deliveries, webhook_attempts TO service_role;
        REVOKE ALL ON FUNCTION imagegen_take_webhook() FROM PUBLIC, anon, authenticated;
        REVOKE ALL ON FUNCTION imagegen_enqueue_webhook() FROM PUBLIC, anon, authenticated;
    END IF;
END
$supabase$;
