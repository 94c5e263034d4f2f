-- 0003: a released job may come back later, not only at once: finish_jobs_v1's 'release' takes
-- its delay (0, what every earlier worker sends, keeps the old meaning). Circuit breakers use it
-- to postpone a request they did not send without spending an attempt.
-- Write a batch of outcomes in one statement. Each element only counts when its lease token is
-- still the job's current one: a worker that lost its lease cannot touch a newer attempt.
--   'completed': the job leaves; its idempotency key is retained for the queue's dedupe_window.
--   'retry'    : back to available at now() + delay seconds, unless the attempt budget is spent
--                (dead 'exhausted') or that would be past expire_at (dead 'expired').
--   'rescue'   : a retry after an expired lease (history outcome 'rescued').
--   'dead'     : straight to dead_jobs with the given reason.
--   'release'  : back to available after `delay` seconds (0: now), the attempt not counted
--                (shutdown, version guard, a circuit breaker that sent nothing).
-- Every counted outcome writes one job_history row, with the executor's `detail` (JSON: what an
-- attempt log needs, e.g. an HTTP status, duration and response excerpt). Returns how many counted.
CREATE OR REPLACE FUNCTION dispatch.finish_jobs_v1(
    ids bigint[], tokens uuid[], outcomes text[], delays double precision[],
    reasons text[], errors text[], statuses integer[], details jsonb[]
) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    counted integer;
    wake text[];
BEGIN
    WITH given AS (
        SELECT * FROM unnest(ids, tokens, outcomes, delays, reasons, errors, statuses, details)
            AS g(id, token, outcome, delay, reason, error, status, detail)
    ), resolved AS (
        SELECT g.id, g.token, g.error, g.status, g.detail, coalesce(g.delay, 0) AS delay,
               CASE WHEN g.outcome NOT IN ('retry', 'rescue') THEN g.outcome
                    WHEN j.expire_at IS NOT NULL
                         AND now() + make_interval(secs => coalesce(g.delay, 0)) > j.expire_at
                         THEN 'dead'
                    WHEN j.attempt >= coalesce(j.max_attempts, q.max_attempts) THEN 'dead'
                    ELSE g.outcome END AS outcome,
               CASE WHEN g.outcome NOT IN ('retry', 'rescue') THEN g.reason
                    WHEN j.expire_at IS NOT NULL
                         AND now() + make_interval(secs => coalesce(g.delay, 0)) > j.expire_at
                         THEN 'expired'
                    ELSE 'exhausted' END AS reason,
               j.attempt, j.leased_by, j.leased_at
        FROM given g
        JOIN dispatch.jobs j ON j.id = g.id AND j.lease_token = g.token
        JOIN dispatch.queues q ON q.name = j.queue
    ), gone AS (
        DELETE FROM dispatch.jobs j USING resolved r
        WHERE j.id = r.id AND j.lease_token = r.token AND r.outcome IN ('completed', 'dead')
        RETURNING j.*, r.outcome AS r_outcome, r.reason AS r_reason, r.error AS r_error,
                  r.status AS r_status, r.detail AS r_detail
    ), again AS (
        UPDATE dispatch.jobs j
        SET state = 'available',
            run_at = now() + make_interval(secs => r.delay),
            attempt = CASE WHEN r.outcome = 'release' THEN j.attempt - 1 ELSE j.attempt END,
            last_error = coalesce(r.error, j.last_error),
            lease_token = NULL, leased_by = NULL, leased_at = NULL, lease_expires_at = NULL
        FROM resolved r
        WHERE j.id = r.id AND j.lease_token = r.token AND r.outcome IN ('retry', 'rescue', 'release')
        RETURNING j.id, j.queue, j.kind, j.tenant, r.outcome AS r_outcome, r.error AS r_error,
                  r.status AS r_status, r.delay AS r_delay, r.attempt AS r_attempt,
                  r.leased_by AS r_worker, r.leased_at AS r_started, r.detail AS r_detail
    ), kept_keys AS (
        INSERT INTO dispatch.idempotency_keys (queue, key, job_id, expires_at)
        SELECT g.queue, g.idempotency_key, g.id, now() + q.dedupe_window
        FROM gone g JOIN dispatch.queues q ON q.name = g.queue
        WHERE g.idempotency_key IS NOT NULL AND q.dedupe_window > '0'
        ON CONFLICT (queue, key) DO UPDATE SET job_id = excluded.job_id, expires_at = excluded.expires_at
    ), buried AS (
        INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, tenant, idempotency_key,
            version, attempt, max_attempts, reason, last_error, last_status, created_at)
        SELECT g.id, g.queue, g.kind, g.args, g.priority, g.tenant, g.idempotency_key, g.version,
               g.attempt, g.max_attempts, g.r_reason, coalesce(g.r_error, g.last_error), g.r_status,
               g.created_at
        FROM gone g WHERE g.r_outcome = 'dead'
        ON CONFLICT (job_id) DO UPDATE SET
            reason = excluded.reason, last_error = excluded.last_error,
            last_status = excluded.last_status, attempt = excluded.attempt, died_at = now()
    ), logged AS (
        INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, tenant, outcome, error,
                                          status, worker, started_at, detail)
        SELECT g.id, g.attempt, g.queue, g.kind, g.tenant, g.r_outcome, g.r_error, g.r_status,
               g.leased_by, g.leased_at, g.r_detail
        FROM gone g
        UNION ALL
        SELECT a.id, a.r_attempt, a.queue, a.kind, a.tenant,
               CASE a.r_outcome WHEN 'retry' THEN 'retried' WHEN 'rescue' THEN 'rescued'
                                ELSE 'released' END,
               a.r_error, a.r_status, a.r_worker, a.r_started, a.r_detail
        FROM again a
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM logged),
           (SELECT array_agg(DISTINCT a.queue) FROM again a
            WHERE a.r_outcome = 'rescue' OR a.r_delay <= 0)
    INTO counted, wake;
    PERFORM pg_notify('dispatch_jobs', w) FROM unnest(wake) w;
    RETURN counted;
END $$;
