-- JobService's named queries, loaded by name by job_service/queries.py (`self._sql["get_job"]`).
--
-- Each query is a `-- name: <name>` line, one or more `-- ` lines saying what it does and why it is written so
-- (its docstring), then its SQL up to the first blank line. Comments between queries are free; anything else
-- outside a query is an error. Parameters are asyncpg's $1, $2...; each docstring names them.
-- tests/unit/test_queries.py checks that every name the code looks up is here and that every query here is used.
--
-- The SQL functions these call (imagegen_*) and the tables are in supabase/schema.sql, generated from the
-- migrations.


-- Jobs, templates and credits (job_service/store.py) ------------------------------------------------------------

-- name: get_job
-- The job by id ($1), or no row.
SELECT * FROM generation_jobs WHERE id = $1

-- name: list_jobs
-- A user's ($1) jobs newest first, keyset-paginated on (created_at, id) after ($3, $4); $2 a state or NULL for
-- all; at most $5. Deleted jobs are gone for their owner. Served by generation_jobs_user_created.
SELECT * FROM generation_jobs
WHERE user_id = $1 AND deleted_at IS NULL
  AND ($2::text IS NULL OR status = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5

-- name: job_and_events_after
-- The job ($1) and its events after seq $2, as arrays. One statement reads one snapshot, so the job is never
-- older than the newest event returned; and it is one round trip, where a read-only transaction of two queries
-- took four.
SELECT g.*, e.seqs, e.types, e.statuses, e.attempts, e.ats, e.messages
FROM generation_jobs g
CROSS JOIN LATERAL (
    SELECT array_agg(seq ORDER BY seq) AS seqs, array_agg(type ORDER BY seq) AS types,
           array_agg(status ORDER BY seq) AS statuses, array_agg(attempt ORDER BY seq) AS attempts,
           array_agg(at ORDER BY seq) AS ats,
           array_agg(coalesce(detail ->> 'message', '') ORDER BY seq) AS messages
    FROM job_events WHERE job_id = g.id AND seq > $2) e
WHERE g.id = $1

-- name: put_input_blobs
-- Stores one input image of a user ($1: user, $2: sha256, $3: media type, $4: bytes; run with executemany). One
-- already stored keeps its bytes and has its created_at moved to now: the orphan sweep
-- (retention_delete_orphan_blobs) spares images stored within its grace, and this create's job is not in yet.
INSERT INTO job_input_blobs (user_id, sha256, mime_type, data, holds) VALUES ($1, $2, $3, $4, 1)
ON CONFLICT (user_id, sha256) DO UPDATE SET created_at = now(), holds = job_input_blobs.holds + 1

-- name: lock_input_blobs
-- Locks a user's ($1) input images whose sha256 is in $2, in one order (two releases never deadlock), so that the
-- release's next statements take their snapshots after every create that stored or released them before.
SELECT 1 FROM job_input_blobs WHERE user_id = $1 AND sha256 = ANY($2::text[]) ORDER BY sha256 FOR UPDATE

-- name: release_input_blob_holds
-- Takes back one hold on each of a user's ($1) input images whose sha256 is in $2 (a create that stored them ended).
UPDATE job_input_blobs SET holds = greatest(holds - 1, 0) WHERE user_id = $1 AND sha256 = ANY($2::text[])

-- name: delete_unheld_input_blobs
-- Deletes those of a user's ($1) input images in $2 that no create holds and no job names; returns how many.
WITH gone AS (
    DELETE FROM job_input_blobs b
    WHERE b.user_id = $1 AND b.sha256 = ANY($2::text[]) AND b.holds = 0
      AND NOT EXISTS (
          SELECT 1 FROM generation_jobs j
          WHERE j.user_id = b.user_id
            AND j.params -> 'input_images' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256)))
    RETURNING 1)
SELECT count(*) FROM gone

-- name: input_blobs
-- The stored bytes of a user's ($1) input images whose sha256 is in $2 (those that exist).
SELECT sha256, data FROM job_input_blobs WHERE user_id = $1 AND sha256 = ANY($2::text[])

-- name: renew_leases
-- Extends by $4 seconds the leases owner $1 still holds on the jobs $2 at attempts $3 (same order): the jobs
-- still held, each with cancel_requested, so a cancel is acted on even if its NOTIFY was missed.
UPDATE generation_jobs g SET lease_expires_at = now() + make_interval(secs => $4)
FROM unnest($2::uuid[], $3::int[]) AS h(id, attempt)
WHERE g.id = h.id AND g.attempt = h.attempt AND g.status = 'generating' AND g.lease_owner = $1
RETURNING g.id, g.cancel_requested

-- name: expired_leases
-- Up to $1 generating jobs whose lease ran out (their replica died or stalled), oldest lease first.
SELECT * FROM generation_jobs WHERE status = 'generating' AND lease_expires_at < now()
ORDER BY lease_expires_at LIMIT $1

-- name: list_templates
-- The templates by id; only the active ones when $1 is true.
SELECT * FROM templates WHERE $1 = false OR is_active ORDER BY id

-- name: get_template
-- The template by id ($1), active or not, or no row.
SELECT * FROM templates WHERE id = $1

-- name: ensure_account
-- Opens user $1's credit account with $2 credits if it has none (a no-op otherwise), so a balance is always there.
SELECT imagegen_ensure_account($1, $2)

-- name: credit_balance
-- User $1's balance, premium flag, and the credits reserved by their active jobs (run after ensure_account).
SELECT a.balance, a.is_premium,
       coalesce((SELECT sum(credits_reserved) FROM generation_jobs
                 WHERE user_id = a.user_id AND status IN ('pending', 'generating')), 0)
           AS reserved
FROM credit_accounts a WHERE a.user_id = $1

-- name: grant_credits
-- Grants $2 credits to user $1 for reason $3, setting premium to $4 unless NULL, opening the account with $5
-- credits if needed; $6 an idempotency key or NULL. The account after it, and granted false for a replay.
SELECT balance, is_premium, granted FROM imagegen_grant_credits_v2($1, $2, $3, $4, $5, $6)


-- Storage sweeper (job_service/cleanup.py) ---------------------------------------------------------------------

-- name: cleanup_take_due
-- Up to $1 storage_cleanups rows due now and created over $2 seconds ago, leased for $3 seconds by pushing
-- their not_before (FOR UPDATE SKIP LOCKED: replicas never take the same row). With each, what to keep: the
-- job's recorded images (result_paths, and images[].storage_path in case the two ever differ), or nothing for a
-- row that asks for everything or whose job is gone.
WITH due AS (
    SELECT job_id FROM storage_cleanups
    WHERE not_before <= now() AND created_at <= now() - make_interval(secs => $2)
    ORDER BY not_before
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE storage_cleanups c SET not_before = now() + make_interval(secs => $3)
FROM due LEFT JOIN generation_jobs g ON g.id = due.job_id
WHERE c.job_id = due.job_id
RETURNING c.job_id::text AS job_id, c.user_id::text AS user_id, c.tries, c.not_before,
    CASE WHEN c.keep_all_recorded AND g.id IS NOT NULL THEN ARRAY(
        SELECT DISTINCT path FROM (
            SELECT unnest(g.result_paths) AS path
            UNION SELECT image ->> 'storage_path' FROM jsonb_array_elements(g.images) image
        ) recorded WHERE path IS NOT NULL
    ) ELSE '{}'::text[] END AS keep_paths

-- name: cleanup_done
-- Deletes job $1's row once its folder is swept, only if this sweeper's lease ($2, the not_before it set) still
-- holds it.
DELETE FROM storage_cleanups WHERE job_id = $1 AND not_before = $2

-- name: cleanup_failed
-- Records a failed sweep of job $1 (error $3) and retries it in $4 seconds, only if the lease $2 still holds.
UPDATE storage_cleanups
SET tries = tries + 1, last_error = $3, not_before = now() + make_interval(secs => $4)
WHERE job_id = $1 AND not_before = $2

-- name: cleanup_waiting
-- Folders still to sweep, due or not (all replicas).
SELECT count(*) FROM storage_cleanups


-- Retention and deletion (job_service/retention.py) ------------------------------------------------------------
-- "Ended" is `status NOT IN ('pending', 'generating')`: whatever the terminal states are. A job's images lose
-- their URL with its objects, for those who read the row itself (Supabase Realtime and RLS readers): each keeps
-- its place, path and size with an empty url, as GetJob shows it. 3600.0 in the deletes is
-- retention.INPUT_BLOB_GRACE_SECONDS (tests/unit/test_queries.py checks they agree).

-- name: retention_mark_deleted
-- DeleteJob of job $1: marks it deleted and, if it has ended, queues its objects in the same statement (one still
-- running is queued by the next pass after it ends). Ownership was checked by the caller; `deleted_at IS NULL`
-- makes a second deletion (or two at once) find nothing. Returns whether it had ended; no row if not there.
WITH marked AS (
    UPDATE generation_jobs SET deleted_at = now(),
        images_deleted_at = CASE WHEN status NOT IN ('pending', 'generating') THEN now() ELSE images_deleted_at END,
        result_urls = CASE WHEN status NOT IN ('pending', 'generating') THEN '{}' ELSE result_urls END,
        images = CASE WHEN status NOT IN ('pending', 'generating')
                      THEN coalesce((SELECT jsonb_agg(jsonb_set(i, '{url}', '""') ORDER BY n)
                                     FROM jsonb_array_elements(images) WITH ORDINALITY AS e(i, n)), '[]'::jsonb)
                      ELSE images END
    WHERE id = $1 AND deleted_at IS NULL
    RETURNING id, user_id, completed_at, status NOT IN ('pending', 'generating') AS ended
), queued AS (
    INSERT INTO storage_cleanups (job_id, user_id, keep_all_recorded, created_at)
    SELECT id, user_id, false, coalesce(completed_at, now()) FROM marked WHERE ended
    ON CONFLICT (job_id) DO UPDATE SET keep_all_recorded = false, not_before = now()
)
SELECT ended FROM marked

-- name: retention_queue_deleted
-- Queues the objects of up to $1 jobs deleted by DeleteJob that have ended since: marks their images deleted and
-- upserts a nothing-kept storage_cleanups row whose created_at is when the job ended (the sweeper's delay counts
-- from then). An existing row is turned into a nothing-kept one with its not_before reset, which also fences a
-- sweep of it in flight whose keep list is now wrong. Returns how many.
WITH due AS (
    SELECT id FROM generation_jobs
    WHERE images_deleted_at IS NULL AND status NOT IN ('pending', 'generating') AND deleted_at IS NOT NULL
    ORDER BY deleted_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE generation_jobs g SET images_deleted_at = now(), result_urls = '{}',
        images = coalesce((SELECT jsonb_agg(jsonb_set(i, '{url}', '""') ORDER BY n)
                           FROM jsonb_array_elements(images) WITH ORDINALITY AS e(i, n)), '[]'::jsonb)
    FROM due WHERE g.id = due.id
    RETURNING g.id, g.user_id, g.completed_at
), queued AS (
    INSERT INTO storage_cleanups (job_id, user_id, keep_all_recorded, created_at)
    SELECT id, user_id, false, coalesce(completed_at, now()) FROM marked
    ON CONFLICT (job_id) DO UPDATE SET keep_all_recorded = false, not_before = now()
)
SELECT count(*) FROM marked

-- name: retention_queue_expired
-- As retention_queue_deleted, for up to $1 jobs that ended over $2 seconds ago (image retention).
WITH due AS (
    SELECT id FROM generation_jobs
    WHERE images_deleted_at IS NULL AND status NOT IN ('pending', 'generating')
      AND completed_at <= now() - make_interval(secs => $2)
    ORDER BY completed_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE generation_jobs g SET images_deleted_at = now(), result_urls = '{}',
        images = coalesce((SELECT jsonb_agg(jsonb_set(i, '{url}', '""') ORDER BY n)
                           FROM jsonb_array_elements(images) WITH ORDINALITY AS e(i, n)), '[]'::jsonb)
    FROM due WHERE g.id = due.id
    RETURNING g.id, g.user_id, g.completed_at
), queued AS (
    INSERT INTO storage_cleanups (job_id, user_id, keep_all_recorded, created_at)
    SELECT id, user_id, false, coalesce(completed_at, now()) FROM marked
    ON CONFLICT (job_id) DO UPDATE SET keep_all_recorded = false, not_before = now()
)
SELECT count(*) FROM marked

-- name: retention_delete_deleted
-- Deletes up to $1 jobs deleted by DeleteJob whose objects are confirmed gone (queued, and their storage_cleanups
-- row deleted by a sweep that succeeded), with their events (ON DELETE CASCADE). The same statement deletes their
-- input images that no other job names (the CTEs share one snapshot, so the jobs deleted here are left out of that
-- check by id); one two jobs shared, deleted by two replicas at once, or stored again within the grace, is left to
-- retention_delete_orphan_blobs. Returns the deleted ids.
WITH gone AS (
    SELECT g.id FROM generation_jobs g
    WHERE g.images_deleted_at IS NOT NULL AND g.status NOT IN ('pending', 'generating') AND g.deleted_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM storage_cleanups c WHERE c.job_id = g.id)
    ORDER BY g.deleted_at
    LIMIT $1
    FOR UPDATE OF g SKIP LOCKED
), deleted AS (
    DELETE FROM generation_jobs g USING gone WHERE g.id = gone.id
    RETURNING g.id, g.user_id, g.params
), inputs AS (
    SELECT DISTINCT d.user_id, i ->> 'sha256' AS sha256
    FROM deleted d, jsonb_array_elements(coalesce(d.params -> 'input_images', '[]'::jsonb)) AS i
    WHERE jsonb_typeof(i) = 'object' AND i ? 'sha256'
), blobs AS (
    DELETE FROM job_input_blobs b USING inputs
    WHERE b.user_id = inputs.user_id AND b.sha256 = inputs.sha256
      AND b.created_at <= now() - make_interval(secs => 3600.0)
      AND NOT EXISTS (
        SELECT 1 FROM generation_jobs j
        WHERE j.user_id = b.user_id AND j.id NOT IN (SELECT id FROM deleted)
          AND j.params -> 'input_images' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256)))
)
SELECT id FROM deleted

-- name: retention_delete_expired
-- As retention_delete_deleted, for up to $1 jobs that ended over $2 seconds ago (job retention).
WITH gone AS (
    SELECT g.id FROM generation_jobs g
    WHERE g.images_deleted_at IS NOT NULL AND g.status NOT IN ('pending', 'generating')
      AND g.completed_at <= now() - make_interval(secs => $2)
      AND NOT EXISTS (SELECT 1 FROM storage_cleanups c WHERE c.job_id = g.id)
    ORDER BY g.completed_at
    LIMIT $1
    FOR UPDATE OF g SKIP LOCKED
), deleted AS (
    DELETE FROM generation_jobs g USING gone WHERE g.id = gone.id
    RETURNING g.id, g.user_id, g.params
), inputs AS (
    SELECT DISTINCT d.user_id, i ->> 'sha256' AS sha256
    FROM deleted d, jsonb_array_elements(coalesce(d.params -> 'input_images', '[]'::jsonb)) AS i
    WHERE jsonb_typeof(i) = 'object' AND i ? 'sha256'
), blobs AS (
    DELETE FROM job_input_blobs b USING inputs
    WHERE b.user_id = inputs.user_id AND b.sha256 = inputs.sha256
      AND b.created_at <= now() - make_interval(secs => 3600.0)
      AND NOT EXISTS (
        SELECT 1 FROM generation_jobs j
        WHERE j.user_id = b.user_id AND j.id NOT IN (SELECT id FROM deleted)
          AND j.params -> 'input_images' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256)))
)
SELECT id FROM deleted

-- name: retention_delete_orphan_blobs
-- Deletes up to $1 input images that no job names (a refused CreateJob's, or one a job deletion left) and that
-- were stored over $2 seconds ago: CreateJob stores the bytes before it inserts its job, so a younger one may
-- belong to a create in flight. Returns their sha256s.
WITH due AS (
    SELECT b.user_id, b.sha256 FROM job_input_blobs b
    WHERE b.created_at <= now() - make_interval(secs => $2)
      AND NOT EXISTS (
        SELECT 1 FROM generation_jobs j
        WHERE j.user_id = b.user_id
          AND j.params -> 'input_images' @> jsonb_build_array(jsonb_build_object('sha256', b.sha256)))
    ORDER BY b.created_at
    LIMIT $1
    FOR UPDATE OF b SKIP LOCKED
)
DELETE FROM job_input_blobs b USING due WHERE b.user_id = due.user_id AND b.sha256 = due.sha256
RETURNING b.sha256


-- Webhook outbox (job_service/webhook_store.py) ----------------------------------------------------------------

-- name: webhook_claim
-- Up to $2 due deliveries, leased to owner $1 for $3 seconds (attempts counts this send): each the earliest of
-- its job still pending (a job's next delivery waits until the one before is delivered or given up), skipping
-- rows another replica holds. Each with the job snapshot its event left, typed back into a generation_jobs row.
WITH due AS (
    SELECT d.id FROM webhook_deliveries d
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
      AND (d.lease_expires_at IS NULL OR d.lease_expires_at < now())
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                      WHERE p.job_id = d.job_id AND p.state = 'pending' AND p.seq < d.seq)
    ORDER BY d.next_attempt_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d SET lease_owner = $1,
        lease_expires_at = now() + make_interval(secs => $3), attempts = d.attempts + 1
    FROM due WHERE d.id = due.id
    RETURNING d.id AS delivery_id, d.job_id AS delivery_job_id, d.seq AS delivery_seq,
              d.type AS delivery_type, d.url AS delivery_url, d.job AS snapshot, d.event_at,
              d.attempts AS delivery_attempts, d.created_at AS delivery_created_at
)
SELECT c.*, s.* FROM claimed c
CROSS JOIN LATERAL jsonb_populate_record(NULL::generation_jobs, c.snapshot) s

-- name: webhook_record
-- Records send $2 of delivery $1 ($3 seconds, HTTP status $4, error $5, by owner $6) and moves the delivery to
-- state $7: 'delivered', 'failed' (given up) or back to 'pending' for $8 seconds. No row when owner $6 no longer
-- held it (its lease ran out and another replica took it over); the attempt is recorded either way.
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, duration_seconds, http_status, error, worker)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (delivery_id, attempt) DO NOTHING
)
UPDATE webhook_deliveries SET state = $7, last_status = $4, last_error = nullif($5, ''),
    lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = CASE WHEN $7 = 'pending' THEN now() + make_interval(secs => $8)
                           ELSE next_attempt_at END,
    ended_at = CASE WHEN $7 = 'pending' THEN NULL ELSE now() END
WHERE id = $1 AND state = 'pending' AND lease_owner = $6 AND attempts = $2
RETURNING state

-- name: webhook_release
-- Hands back the deliveries $2 that owner $1 abandoned (shutdown): due again at once, on any replica.
UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL
WHERE id = ANY($2::uuid[]) AND lease_owner = $1 AND state = 'pending'

-- name: webhook_next_due_in
-- Seconds until the earliest claimable delivery is due (<= 0: now); NULL when none is pending. Only the earliest
-- pending delivery of each job counts: the ones behind it are not claimable however overdue they are, and
-- counting them would have a sender poll in a loop while the first waits to retry.
SELECT extract(epoch FROM min(greatest(d.next_attempt_at,
                                       coalesce(d.lease_expires_at, d.next_attempt_at))) - now())
FROM webhook_deliveries d
WHERE d.state = 'pending'
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p
                  WHERE p.job_id = d.job_id AND p.state = 'pending' AND p.seq < d.seq)

-- name: webhook_deliveries_of_job
-- Job $1's deliveries in event order, each with its sends as arrays in attempt order (ListWebhookDeliveries).
SELECT d.id, d.seq, d.type, d.state, d.created_at, d.ended_at, d.next_attempt_at, d.last_error,
       coalesce(array_agg(a.attempt ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL), '{}')
           AS numbers,
       array_agg(a.at ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS ats,
       array_agg(a.duration_seconds ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL)
           AS durations,
       array_agg(a.http_status ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS statuses,
       array_agg(a.error ORDER BY a.attempt) FILTER (WHERE a.attempt IS NOT NULL) AS errors
FROM webhook_deliveries d LEFT JOIN webhook_attempts a ON a.delivery_id = d.id
WHERE d.job_id = $1 GROUP BY d.id ORDER BY d.seq

-- name: webhook_queue_stats
-- The outbox for the metrics: pending deliveries, how many are due, and the oldest one's age in seconds.
SELECT count(*) AS pending, count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest
FROM webhook_deliveries WHERE state = 'pending'


-- Metrics (job_service/metrics.py) -----------------------------------------------------------------------------

-- name: job_queue_stats
-- Per active state: jobs, how many are due, and the oldest one's age in seconds. One query over the active jobs
-- (indexed: generation_jobs_user_active covers pending and generating).
SELECT status, count(*) AS jobs,
       count(*) FILTER (WHERE next_attempt_at <= now()) AS due,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest
FROM generation_jobs WHERE status IN ('pending', 'generating') GROUP BY status


-- Job state changes (job_service/store.py): each one call of a SQL function, one transaction --------------------

-- name: create_job
-- One CreateJob (imagegen_create_job_v5, its 20 parameters in order): the job as created, whether this call made
-- it, the columns its claim changed (NULL when it did not claim), and the events it committed as arrays.
SELECT (r.job).*, r.created,
       (r.claimed).status AS claimed_status, (r.claimed).attempt AS claimed_attempt,
       (r.claimed).lease_owner AS claimed_by, (r.claimed).started_at AS claimed_started_at,
       (r.claimed).last_event_seq AS claimed_seq,
       e.seqs, e.types, e.statuses, e.attempts, e.ats, e.messages
FROM imagegen_create_job_v5($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                            $15, $16, $17, $18, $19, $20) r
CROSS JOIN LATERAL (
    SELECT array_agg(seq ORDER BY seq) AS seqs, array_agg(type ORDER BY seq) AS types,
           array_agg(status ORDER BY seq) AS statuses, array_agg(attempt ORDER BY seq) AS attempts,
           array_agg(at ORDER BY seq) AS ats,
           array_agg(coalesce(detail ->> 'message', '') ORDER BY seq) AS messages
    FROM unnest(r.events)) e

-- name: create_jobs
-- A batch of creates ($1: a JSON array of create_job's parameters by name; imagegen_create_jobs_v3), each in a
-- subtransaction of its own: a row per create, as create_job answers it, with its position (idx) and, when the
-- create rules refused it, the SQLSTATE, message and detail instead of a job.
SELECT r.idx, (r.job).*, r.created,
       (r.claimed).status AS claimed_status, (r.claimed).attempt AS claimed_attempt,
       (r.claimed).lease_owner AS claimed_by, (r.claimed).started_at AS claimed_started_at,
       (r.claimed).last_event_seq AS claimed_seq,
       e.seqs, e.types, e.statuses, e.attempts, e.ats, e.messages,
       r.error_code, r.error_message, r.error_detail
FROM imagegen_create_jobs_v3($1) r
CROSS JOIN LATERAL (
    SELECT array_agg(seq ORDER BY seq) AS seqs, array_agg(type ORDER BY seq) AS types,
           array_agg(status ORDER BY seq) AS statuses, array_agg(attempt ORDER BY seq) AS attempts,
           array_agg(at ORDER BY seq) AS ats,
           array_agg(coalesce(detail ->> 'message', '') ORDER BY seq) AS messages
    FROM unnest(r.events)) e

-- name: advance
-- One fenced change of a job ($1; imagegen_advance's parameters by name), and the credits the job held before it
-- (reserved_before: what a change that ends the job released). A row of NULLs when the fence refused it.
SELECT a.*, (SELECT g.credits_reserved FROM generation_jobs g WHERE g.id = $1) AS reserved_before
FROM imagegen_advance(
    p_id => $1, p_attempt => $2, p_from => $3, p_event => $4, p_to => $5, p_message => $6,
    p_error_code => $7, p_image => $8, p_filtered => $9, p_filtered_reasons => $10,
    p_retry_delay => $11, p_cancel_requested => $12, p_count_failure => $13,
    p_only_if_lease_expired => $14) a

-- name: advance_batch
-- Fenced changes of a job ($1) at attempt $2 from states $3, in order in one transaction ($4: a JSON array): the
-- job after each one applied, up to the first the fence refused; reserved_before as for advance.
SELECT b.*, (SELECT g.credits_reserved FROM generation_jobs g WHERE g.id = $1) AS reserved_before
FROM imagegen_advance_batch($1, $2, $3, $4) b

-- name: claim_jobs
-- Claims up to $2 due jobs for owner $1 with a lease of $3 seconds (SKIP LOCKED, in dispatch order).
SELECT * FROM imagegen_claim_jobs($1, $2, $3)

-- name: expire_jobs
-- Ends up to $1 jobs past their start deadline that never started; reserved_before: the credits each released.
SELECT (e.job).*, e.released AS reserved_before FROM imagegen_expire_jobs($1) e
