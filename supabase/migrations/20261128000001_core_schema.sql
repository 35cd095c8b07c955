-- Core schema of imagegen: jobs, their event history, templates, credits.
-- Plain PostgreSQL (15+), so it applies to embedded PostgreSQL, any server and Supabase alike;
-- what needs Supabase's own schemas lives in the supabase-only migrations.

CREATE TABLE IF NOT EXISTS templates (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    description     text NOT NULL DEFAULT '',
    prompt_template text NOT NULL,
    model           text NOT NULL DEFAULT '',
    default_params  jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- NULL: the model's price applies.
    price_per_image integer CHECK (price_per_image >= 0),
    is_active       boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS generation_jobs (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          uuid NOT NULL,
    template_id      text REFERENCES templates (id),
    prompt           text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'generating', 'completed', 'failed', 'cancelled')),
    result_urls      text[] NOT NULL DEFAULT '{}',
    error_message    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    model            text NOT NULL,
    params           jsonb NOT NULL,
    request_id       text,
    -- A digest of the request, to tell an idempotent retry from a reused request_id.
    request_hash     text,
    -- Claims so far; every claim increments it, and every write of an attempt is fenced on it.
    attempt          integer NOT NULL DEFAULT 0,
    -- Attempts that failed in a way that counts toward max_attempts (not "generator unreachable").
    failed_attempts  integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    lease_owner      text,
    lease_expires_at timestamptz,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean NOT NULL DEFAULT false,
    credits_reserved integer NOT NULL DEFAULT 0 CHECK (credits_reserved >= 0),
    credits_charged  integer NOT NULL DEFAULT 0 CHECK (credits_charged >= 0),
    price_per_image  integer NOT NULL DEFAULT 0 CHECK (price_per_image >= 0),
    -- Images of the attempt that completed: [{index, url, storage_path, mime_type, width, height, size_bytes}].
    images           jsonb NOT NULL DEFAULT '[]'::jsonb,
    result_paths     text[] NOT NULL DEFAULT '{}',
    filtered_count   integer NOT NULL DEFAULT 0,
    filtered_reasons text[] NOT NULL DEFAULT '{}',
    error_code       text,
    started_at       timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The seq of the job's latest job_events row; watchers resume from it.
    last_event_seq   bigint NOT NULL DEFAULT 0,
    CONSTRAINT generation_jobs_request_id_unique UNIQUE (user_id, request_id)
);

-- ListJobs: a user's jobs newest first (keyset on created_at, id).
CREATE INDEX IF NOT EXISTS generation_jobs_user_created
    ON generation_jobs (user_id, created_at DESC, id DESC);
-- The dispatcher's claim: due pending jobs.
CREATE INDEX IF NOT EXISTS generation_jobs_due
    ON generation_jobs (next_attempt_at) WHERE status = 'pending';
-- The reaper: generating jobs whose lease ran out.
CREATE INDEX IF NOT EXISTS generation_jobs_leases
    ON generation_jobs (lease_expires_at) WHERE status = 'generating';
-- The per-user cap on active jobs.
CREATE INDEX IF NOT EXISTS generation_jobs_user_active
    ON generation_jobs (user_id) WHERE status IN ('pending', 'generating');

CREATE TABLE IF NOT EXISTS job_events (
    job_id  uuid NOT NULL REFERENCES generation_jobs (id) ON DELETE CASCADE,
    seq     bigint NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    type    text NOT NULL,
    status  text NOT NULL,
    attempt integer NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE IF NOT EXISTS credit_accounts (
    user_id    uuid PRIMARY KEY,
    balance    bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    is_premium boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Append-only. amount is the row's effect on the balance: grant +n, reserve -n, release +n, capture -n.
-- A job's reservation settles as one release of all of it and one capture of what was delivered, so
-- balance = sum(amount) per user at every moment. images records usage, also for premium (amount 0).
CREATE TABLE IF NOT EXISTS credit_ledger (
    id      bigserial PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES credit_accounts (user_id),
    job_id  uuid REFERENCES generation_jobs (id),
    kind    text NOT NULL CHECK (kind IN ('grant', 'reserve', 'capture', 'release')),
    amount  bigint NOT NULL,
    images  integer NOT NULL DEFAULT 0,
    reason  text NOT NULL DEFAULT '',
    at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS credit_ledger_user ON credit_ledger (user_id);
-- A job is reserved, released and captured at most once each: the database refuses a double charge.
CREATE UNIQUE INDEX IF NOT EXISTS credit_ledger_once_per_job
    ON credit_ledger (job_id, kind) WHERE job_id IS NOT NULL;
