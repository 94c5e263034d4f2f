-- 0006: the engine review. Kept in step with sql/schema.sql (tests/test_migrations.py).
--  * scheduled jobs live in state 'scheduled' (0005); the claim promotes the ones that came due
--  * claim/finish/extend/rescue _v2 (the _v1 functions stay for workers of the previous release)
--  * rescued attempts back off like retries; dead jobs keep expire_at; retry_dead keeps it, the
--    idempotency key and created_at, and refuses to revive an expired job without a new expiry
--  * an expire_at already past is accepted at insert (the job dies 'expired', never runs)
--  * producers may insert only the documented columns
--  * history maintenance never queues the outcome path behind a long reader: no default
--    partition, partitions a week ahead, lock_timeout, detach concurrently, one worker at a time
--  * request attempts are masked; workers record their kinds and lease; elected duties

-- Scheduled jobs ---------------------------------------------------------------------------------
-- When a job was parked for want of a worker that runs its kind and build (claim_jobs_v2).
ALTER TABLE dispatch.jobs ADD COLUMN parked_at timestamptz;

UPDATE dispatch.jobs SET state = 'scheduled' WHERE state = 'available' AND run_at > now();

CREATE FUNCTION dispatch.schedule_future_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'available' THEN
        NEW.state := 'scheduled';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_schedule_future BEFORE INSERT ON dispatch.jobs
    FOR EACH ROW WHEN (NEW.run_at > now())
    EXECUTE FUNCTION dispatch.schedule_future_job();

CREATE INDEX jobs_scheduled ON dispatch.jobs (queue, run_at) WHERE state = 'scheduled';
-- newer_build_waiting: a range scan of versions above the worker's, not a walk of the backlog.
CREATE INDEX jobs_waiting_version ON dispatch.jobs (version) WHERE state <> 'running';
-- Parked jobs (no live worker runs their kind or build) by kind: a worker that starts with the
-- kind takes them back at once.
CREATE INDEX jobs_parked ON dispatch.jobs (kind) WHERE parked_at IS NOT NULL;

-- Expiry in flight is not an input error ------------------------------------------------------
ALTER TABLE dispatch.jobs DROP CONSTRAINT job_expire_at_after_created_at;

-- Dead jobs keep their expiry; dead letters are pruned by age ---------------------------------
ALTER TABLE dispatch.dead_jobs ADD COLUMN expire_at timestamptz;
CREATE INDEX idempotency_keys_expires_at ON dispatch.idempotency_keys (expires_at);

-- Workers record what they can run and how long their leases are ---------------------------
ALTER TABLE dispatch.workers ADD COLUMN kinds text[] NOT NULL DEFAULT '{}';
ALTER TABLE dispatch.workers ADD COLUMN lease_seconds double precision NOT NULL DEFAULT 30;
-- Per-process figures (caches, open circuits) published with each heartbeat, for /stats.
ALTER TABLE dispatch.workers ADD COLUMN stats jsonb NOT NULL DEFAULT '{}';

-- Duties: background work one worker of all does at a time (history maintenance, vacuum).
CREATE TABLE dispatch.duties (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE FUNCTION dispatch.take_duty_v1(duty text, worker_id text, lease interval) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    taken boolean;
BEGIN
    INSERT INTO dispatch.duties AS d (name, holder, expires_at)
    VALUES (duty, worker_id, now() + lease)
    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
        WHERE d.holder = excluded.holder OR d.expires_at < now()
    RETURNING true INTO taken;
    RETURN coalesce(taken, false);
END $$;

CREATE FUNCTION dispatch.release_duties_v1(worker_id text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM dispatch.duties WHERE holder = worker_id
$$;

-- Claim v2: promotes this queue's scheduled jobs that came due, then claims in priority, run_at,
-- id order. Expired jobs are claimable by any worker (they die 'expired' without running, so the
-- kind and build do not matter). A claim that comes back short has walked every runnable row of
-- the queue: it parks the ones no live worker can run (unknown kind, newer build) for five
-- minutes, so idle polls of every process stop walking them; a worker that starts with their kind
-- takes them back at once (unpark_jobs_v1), and the next look is five minutes on.
CREATE FUNCTION dispatch.claim_jobs_v2(
    worker_id text, queue_name text, kinds text[], worker_version bigint,
    max_jobs integer, lease interval
) RETURNS TABLE (
    id bigint, queue text, kind text, args jsonb, priority smallint, attempt integer,
    max_attempts integer, tenant text, run_at timestamptz, expire_at timestamptz,
    created_at timestamptz, lease_token uuid, expired boolean
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    got integer;
BEGIN
    IF (SELECT q.paused FROM dispatch.queues q WHERE q.name = queue_name) IS NOT FALSE THEN
        RETURN;  -- paused, or no such queue
    END IF;
    -- = ANY (ARRAY(...)): primary-key lookups whatever the statistics say (IN may hash-join
    -- against a scan of the whole table).
    UPDATE dispatch.jobs j SET state = 'available'
    WHERE j.id = ANY (ARRAY(SELECT s.id FROM dispatch.jobs s
                            WHERE s.state = 'scheduled' AND s.queue = queue_name AND s.run_at <= now()
                            ORDER BY s.run_at LIMIT max_jobs
                            FOR UPDATE SKIP LOCKED));
    RETURN QUERY
    WITH picked AS (
        SELECT j.id FROM dispatch.jobs j
        WHERE j.state = 'available'
          AND j.queue = queue_name
          AND j.run_at <= now()
          AND ((j.kind = ANY (kinds) AND j.version <= worker_version) OR j.expire_at <= now())
        ORDER BY j.priority, j.run_at, j.id
        LIMIT max_jobs
        FOR UPDATE SKIP LOCKED
    )
    UPDATE dispatch.jobs j
    SET state = 'running', attempt = j.attempt + 1, lease_token = gen_random_uuid(),
        leased_by = worker_id, leased_at = now(), lease_expires_at = now() + lease, parked_at = NULL
    FROM picked, dispatch.queues q
    WHERE j.id = picked.id AND q.name = j.queue
    RETURNING j.id, j.queue, j.kind, j.args, j.priority, j.attempt,
              coalesce(j.max_attempts, q.max_attempts), j.tenant, j.run_at, j.expire_at,
              j.created_at, j.lease_token, j.expire_at IS NOT NULL AND j.expire_at <= now();
    GET DIAGNOSTICS got = ROW_COUNT;
    IF got < max_jobs THEN
        UPDATE dispatch.jobs j
        SET state = 'scheduled', run_at = now() + interval '5 minutes',
            parked_at = coalesce(j.parked_at, now())
        WHERE j.id = ANY (ARRAY(
            SELECT a.id FROM dispatch.jobs a
            WHERE a.state = 'available' AND a.queue = queue_name
              AND (a.expire_at IS NULL OR a.expire_at > now())
              AND NOT EXISTS (
                  SELECT 1 FROM dispatch.workers w
                  WHERE w.stopped_at IS NULL
                    AND w.heartbeat_at > now() - make_interval(secs => w.lease_seconds)
                    AND ('*' = ANY (w.queues) OR a.queue = ANY (w.queues))
                    AND a.kind = ANY (w.kinds) AND w.version >= a.version)
            ORDER BY a.priority, a.run_at, a.id  -- the claim index, not a scan
            LIMIT 10000
            FOR UPDATE SKIP LOCKED));
    END IF;
END $$;

-- A worker starting with these kinds (at this build) takes back the jobs parked for want of it.
CREATE FUNCTION dispatch.unpark_jobs_v1(kinds text[], worker_version bigint, queues text[])
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
    woken text[];
BEGIN
    WITH back AS (
        UPDATE dispatch.jobs j SET state = 'available', run_at = now(), parked_at = NULL
        WHERE j.parked_at IS NOT NULL AND j.state = 'scheduled' AND j.kind = ANY (kinds)
          AND j.version <= worker_version AND ('*' = ANY (queues) OR j.queue = ANY (queues))
        RETURNING j.queue
    )
    SELECT count(*), array_agg(DISTINCT b.queue) INTO n, woken FROM back b;
    PERFORM pg_notify('dispatch_jobs', q) FROM unnest(woken) q;
    RETURN n;
END $$;

-- Finish v2: as v1, but a job coming back later is 'scheduled' (only due jobs are 'available'),
-- and dead jobs keep their expire_at.
CREATE FUNCTION dispatch.finish_jobs_v2(
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
        SET state = CASE WHEN r.delay > 0 THEN 'scheduled' ELSE 'available' END::dispatch.job_state,
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
            version, attempt, max_attempts, reason, last_error, last_status, created_at, expire_at)
        SELECT g.id, g.queue, g.kind, g.args, g.priority, g.tenant, g.idempotency_key, g.version,
               g.attempt, g.max_attempts, g.r_reason, coalesce(g.r_error, g.last_error), g.r_status,
               g.created_at, g.expire_at
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
           (SELECT array_agg(DISTINCT a.queue) FROM again a WHERE a.r_delay <= 0)
    INTO counted, wake;
    PERFORM pg_notify('dispatch_jobs', w) FROM unnest(wake) w;
    RETURN counted;
END $$;

-- Rescue v2: an expired lease counts as an attempt and backs off like a retry (the queue's
-- backoff), so a job that kills its worker cannot take one down per lease period.
CREATE FUNCTION dispatch.rescue_expired_v2(max_jobs integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ids bigint[];
    tokens uuid[];
    waits double precision[];
    n integer;
BEGIN
    SELECT array_agg(s.id), array_agg(s.lease_token), array_agg(s.wait) INTO ids, tokens, waits
    FROM (SELECT j.id, j.lease_token,
                 least(extract(epoch FROM q.backoff_cap),
                       extract(epoch FROM q.backoff_base)
                       * power(q.backoff_factor, least(greatest(j.attempt - 1, 0), 64)))
                 * (1 + q.backoff_jitter * (2 * random() - 1)) AS wait
          FROM dispatch.jobs j JOIN dispatch.queues q ON q.name = j.queue
          WHERE j.state = 'running' AND j.lease_expires_at < now()
          ORDER BY j.lease_expires_at LIMIT max_jobs
          FOR UPDATE OF j SKIP LOCKED) s;
    n := coalesce(cardinality(ids), 0);
    IF n = 0 THEN
        RETURN 0;
    END IF;
    RETURN dispatch.finish_jobs_v2(
        ids, tokens, array_fill('rescue'::text, ARRAY[n]), waits,
        array_fill(NULL::text, ARRAY[n]),
        array_fill('lease expired: the worker holding it stopped answering'::text, ARRAY[n]),
        array_fill(NULL::integer, ARRAY[n]), array_fill(NULL::jsonb, ARRAY[n]));
END $$;

-- Revive dead jobs under their original id with a fresh attempt budget, keeping what they had:
-- created_at, expire_at, the idempotency key. An expired job needs a new expire_at.
DROP FUNCTION dispatch.retry_dead(bigint[]);
CREATE FUNCTION dispatch.retry_dead(job_ids bigint[], expire_at timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bad text;
BEGIN
    IF retry_dead.expire_at IS NOT NULL AND retry_dead.expire_at <= now() THEN
        RAISE EXCEPTION 'dispatch.retry_dead: the new expire_at % is already past', retry_dead.expire_at
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(d.job_id::text, ', ' ORDER BY d.job_id) INTO bad
    FROM dispatch.dead_jobs d
    WHERE d.job_id = ANY (job_ids) AND retry_dead.expire_at IS NULL
      AND d.expire_at IS NOT NULL AND d.expire_at <= now();
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.retry_dead: job % expired; give a new expire_at to revive it', bad
            USING ERRCODE = 'check_violation',
                  HINT = 'SELECT dispatch.retry_dead(ARRAY[...], expire_at => now() + interval ''1 day'')';
    END IF;
    SELECT string_agg(format('%s (key %L is held by job %s)', d.job_id, d.idempotency_key,
                             coalesce(j.id, k.job_id)), ', ') INTO bad
    FROM dispatch.dead_jobs d
    LEFT JOIN dispatch.jobs j ON j.queue = d.queue AND j.idempotency_key = d.idempotency_key
    LEFT JOIN dispatch.idempotency_keys k ON k.queue = d.queue AND k.key = d.idempotency_key
         AND k.job_id <> d.job_id AND k.expires_at > now()
    WHERE d.job_id = ANY (job_ids) AND (j.id IS NOT NULL OR k.job_id IS NOT NULL);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.retry_dead: cannot revive job %', bad
            USING ERRCODE = 'unique_violation';
    END IF;
    DELETE FROM dispatch.idempotency_keys k USING dispatch.dead_jobs d
    WHERE d.job_id = ANY (job_ids) AND k.queue = d.queue AND k.key = d.idempotency_key;
    RETURN QUERY
    WITH revived AS (
        DELETE FROM dispatch.dead_jobs d WHERE d.job_id = ANY (job_ids) RETURNING d.*
    ), inserted AS (
        INSERT INTO dispatch.jobs (id, queue, kind, args, priority, tenant, version, max_attempts,
                                   created_at, expire_at, idempotency_key)
        SELECT r.job_id, r.queue, r.kind, r.args, r.priority, r.tenant, r.version, r.max_attempts,
               r.created_at, coalesce(retry_dead.expire_at, r.expire_at), r.idempotency_key
        FROM revived r
        RETURNING dispatch.jobs.id
    )
    SELECT i.id FROM inserted i;
END $$;

CREATE FUNCTION dispatch.prune_dead_v1(keep interval, max_rows integer DEFAULT 10000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dead integer;
    keys integer;
BEGIN
    -- One batch of each; returns the larger count: the caller runs it again while that is
    -- max_rows, so each transaction stays short however much has piled up.
    DELETE FROM dispatch.dead_jobs d
    WHERE d.job_id IN (SELECT x.job_id FROM dispatch.dead_jobs x WHERE x.died_at < now() - keep
                       ORDER BY x.died_at LIMIT max_rows);
    GET DIAGNOSTICS dead = ROW_COUNT;
    DELETE FROM dispatch.idempotency_keys k
    WHERE (k.queue, k.key) IN (SELECT x.queue, x.key FROM dispatch.idempotency_keys x
                               WHERE x.expires_at <= now() ORDER BY x.expires_at LIMIT max_rows);
    GET DIAGNOSTICS keys = ROW_COUNT;
    RETURN greatest(dead, keys);
END $$;

-- History partitions ---------------------------------------------------------------------------
-- No default partition: DETACH ... CONCURRENTLY is not allowed beside one, and partitions are
-- created a week ahead, so a row never lacks one while a worker runs.
CREATE FUNCTION dispatch.create_history_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'job_history_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass('dispatch.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- CREATE + ATTACH takes SHARE UPDATE EXCLUSIVE on the parent, which writers do not wait for
    -- (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE).
    EXECUTE format('CREATE TABLE dispatch.%I (LIKE dispatch.job_history)', part);
    EXECUTE format('ALTER TABLE dispatch.job_history ATTACH PARTITION dispatch.%I
                    FOR VALUES FROM (%L) TO (%L)', part, day, day + 1);
    RETURN true;
END $$;

ALTER TABLE dispatch.job_history DETACH PARTITION dispatch.job_history_default;
SELECT dispatch.create_history_partition(d)
FROM (SELECT DISTINCT finished_at::date AS d FROM dispatch.job_history_default) days;
INSERT INTO dispatch.job_history SELECT * FROM dispatch.job_history_default;
DROP TABLE dispatch.job_history_default;

DROP FUNCTION dispatch.ensure_history_partitions(integer);
-- One worker at a time (the others return 0 at once); never waits long for a lock: a partition
-- it cannot attach now is attached by the next run, days before it is needed.
CREATE FUNCTION dispatch.ensure_history_partitions(days_ahead integer DEFAULT 7)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day date;
    created integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgdispatch.history_partitions')) THEN
        RETURN 0;
    END IF;
    PERFORM set_config('lock_timeout', '500ms', true);
    FOR day IN SELECT generate_series(current_date - 1, current_date + days_ahead, '1 day')::date LOOP
        BEGIN
            IF dispatch.create_history_partition(day) THEN
                created := created + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'dispatch.ensure_history_partitions: % busy, next run attaches it', day;
        END;
    END LOOP;
    RETURN created;
END $$;

-- Partitions wholly older than `keep`, and whether a concurrent detach of each is pending.
-- The worker detaches them CONCURRENTLY (outside a transaction, which a function cannot do)
-- and drops them.
CREATE FUNCTION dispatch.history_partitions_older_than(keep interval)
RETURNS TABLE (partition text, detach_pending boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.relname::text, i.inhdetachpending
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'dispatch.job_history'::regclass
      AND c.relname ~ '^job_history_\d{8}$'
      AND to_date(substr(c.relname, 13), 'YYYYMMDD') + 1 <= (now() - keep)::date
    ORDER BY 1
$$;

-- The partitions are dropped by the worker now; this (called hourly by workers of the previous
-- release) only deletes retained idempotency keys that expired.
CREATE OR REPLACE FUNCTION dispatch.prune_history(keep interval) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dispatch.idempotency_keys WHERE expires_at <= now();
    RETURN 0;
END $$;

SELECT dispatch.ensure_history_partitions();

-- Secrets in free text (response bodies, errors): JWTs, bearer/basic credentials, secret-looking
-- JSON members and query or form parameters.
CREATE FUNCTION dispatch.mask_text(doc text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(regexp_replace(regexp_replace(regexp_replace(doc,
        'eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*', '***', 'g'),
        '\m(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]+', '\1\2***', 'gi'),
        '("[^"]*(secret|token|password|passwd|authorization|api[_-]?key|private[_-]?key|signature|credential|cookie)[^"]*"\s*:\s*)("(\\.|[^"\\])*"|[^,}\s]+)',
        '\1"***"', 'gi'),
        '(\m[A-Za-z0-9_.-]*(secret|token|password|passwd|api[_-]?key|signature|credential|auth)[A-Za-z0-9_.-]*=)[^&\s"''<>]+',
        '\1***', 'gi')
$$;

CREATE OR REPLACE VIEW dispatch.request_attempts AS
SELECT h.job_id, h.attempt, coalesce((h.detail ->> 'started_at')::timestamptz, h.started_at) AS started_at,
       (h.detail ->> 'duration_ms')::integer AS duration_ms, h.status, h.outcome,
       h.detail ->> 'error_class' AS error_class, dispatch.mask_text(h.error) AS error_message,
       dispatch.mask_text(h.detail ->> 'response_body') AS response_body,
       dispatch.mask_secrets(h.detail -> 'response_headers') AS response_headers,
       h.finished_at
FROM dispatch.job_history h
WHERE h.kind = 'http.request';

CREATE OR REPLACE VIEW dispatch.queue_stats AS
SELECT q.name AS queue,
       q.paused,
       coalesce(j.available, 0) AS available,
       coalesce(j.scheduled, 0) AS scheduled,
       coalesce(j.running, 0) AS running,
       coalesce(d.dead, 0) AS dead,
       j.oldest_available_at,
       CASE WHEN j.oldest_available_at IS NOT NULL
            THEN extract(epoch FROM now() - j.oldest_available_at)::double precision END
           AS oldest_wait_seconds
FROM dispatch.queues q
LEFT JOIN (
    SELECT queue,
           count(*) FILTER (WHERE state <> 'running' AND run_at <= now()) AS available,
           count(*) FILTER (WHERE state <> 'running' AND run_at > now()) AS scheduled,
           count(*) FILTER (WHERE state = 'running') AS running,
           min(run_at) FILTER (WHERE state <> 'running' AND run_at <= now()) AS oldest_available_at
    FROM dispatch.jobs GROUP BY queue
) j ON j.queue = q.name
LEFT JOIN (SELECT queue, count(*) AS dead FROM dispatch.dead_jobs GROUP BY queue) d ON d.queue = q.name;

-- A worker heartbeats every lease/3: it is lost once a whole lease passes without one.
CREATE OR REPLACE VIEW dispatch.worker_status AS
SELECT w.id, w.host, w.pid, w.version, w.queues, w.slots, w.running, w.completed, w.retried,
       w.dead, w.started_at, w.heartbeat_at,
       CASE WHEN w.stopped_at IS NOT NULL THEN 'stopped'
            WHEN w.heartbeat_at > now() - make_interval(secs => w.lease_seconds) THEN 'alive'
            ELSE 'lost' END AS status,
       w.kinds, w.lease_seconds, w.stats
FROM dispatch.workers w;

CREATE OR REPLACE VIEW dispatch.job_list AS
SELECT j.id, j.queue, j.kind, dispatch.mask_secrets(j.args) AS args, j.priority,
       CASE WHEN j.state = 'running' THEN 'running'
            WHEN j.parked_at IS NOT NULL THEN 'parked'
            WHEN j.run_at > now() THEN 'scheduled' ELSE 'available' END AS state,
       j.run_at, j.expire_at, j.attempt, j.max_attempts, j.tenant, j.version, j.created_at,
       j.last_error, j.leased_by, j.lease_expires_at, j.parked_at
FROM dispatch.jobs j;

-- Requests: an expire_at already past is accepted (the request dies 'expired', nothing sent).
CREATE OR REPLACE FUNCTION dispatch.send_request(
    method           text,
    uri              text,
    body             text DEFAULT NULL,
    expire_at        timestamptz DEFAULT NULL,
    success_code     integer DEFAULT 200,
    stop_codes       integer[] DEFAULT '{}',
    attempt_limit    integer DEFAULT NULL,
    attempt_interval integer DEFAULT 60,
    http_timeout     integer DEFAULT 30,
    queue            text DEFAULT 'requests',
    idempotency_key  text DEFAULT NULL,
    tenant           text DEFAULT NULL,
    claims           jsonb DEFAULT NULL,
    signing_key      text DEFAULT NULL,
    headers          jsonb DEFAULT NULL,
    webhook_key      text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    verb text := upper(method);
    codes integer[];
    budget integer := attempt_limit;
    bad text;
BEGIN
    IF verb IS NULL OR verb NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
        RAISE EXCEPTION 'dispatch.send_request: method must be one of GET, POST, PUT, PATCH, DELETE, got %',
            coalesce(quote_literal(method), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF uri IS NULL OR uri !~* '^https?://[^/?#\s]+([/?#]\S*)?$' THEN
        RAISE EXCEPTION 'dispatch.send_request: uri must be an absolute http(s) URL, got %',
            coalesce(quote_literal(left(uri, 200)), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF success_code IS NULL OR success_code NOT BETWEEN 100 AND 599 THEN
        RAISE EXCEPTION 'dispatch.send_request: success_code must be an HTTP status (100-599), got %',
            coalesce(success_code::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(c::text, ', ') INTO bad FROM unnest(stop_codes) c WHERE c IS NULL OR c NOT BETWEEN 100 AND 599;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.send_request: stop_codes must be HTTP statuses (100-599), got %', bad
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO codes
    FROM unnest(coalesce(stop_codes, '{}') || 418) c WHERE c <> success_code;
    IF attempt_interval IS NULL OR attempt_interval < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_interval must be >= 1 second, got %',
            coalesce(attempt_interval::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF http_timeout IS NULL OR http_timeout NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'dispatch.send_request: http_timeout must be 1-3600 seconds, got %',
            coalesce(http_timeout::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NOT NULL AND budget < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_limit must be >= 1, got %', budget
            USING ERRCODE = 'check_violation';
    END IF;
    IF claims IS NOT NULL THEN
        IF jsonb_typeof(claims) <> 'object' THEN
            RAISE EXCEPTION 'dispatch.send_request: claims must be a JSON object, got %', jsonb_typeof(claims)
                USING ERRCODE = 'check_violation';
        END IF;
        IF body IS NOT NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: give body or claims, not both'
                USING ERRCODE = 'check_violation';
        END IF;
        IF signing_key IS NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: claims need a signing_key'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF signing_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = signing_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(signing_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF webhook_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = webhook_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(webhook_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF headers IS NOT NULL AND (jsonb_typeof(headers) <> 'object'
            OR EXISTS (SELECT 1 FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string'
                                                              OR h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$')) THEN
        RAISE EXCEPTION 'dispatch.send_request: headers must be a JSON object of header names to strings'
            USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NULL THEN
        budget := CASE WHEN expire_at IS NULL THEN 1440
                       ELSE greatest(1, ceil(extract(epoch FROM expire_at - now()) / attempt_interval)::integer)
                  END;
    END IF;
    RETURN dispatch.enqueue(
        'http.request',
        jsonb_strip_nulls(jsonb_build_object(
            'method', verb, 'uri', uri, 'body', body, 'success_code', success_code,
            'stop_codes', to_jsonb(codes), 'attempt_interval', attempt_interval,
            'http_timeout', http_timeout, 'claims', claims, 'signing_key', signing_key,
            'headers', headers, 'webhook_key', webhook_key)),
        queue => queue, expire_at => expire_at, max_attempts => budget,
        idempotency_key => idempotency_key, tenant => tenant);
END $$;

-- Grants ---------------------------------------------------------------------------------------
-- Producers insert only the columns the SQL API documents; id, state, the lease, attempt,
-- version (from SET dispatch.build) and created_at are the engine's.
REVOKE INSERT ON dispatch.jobs FROM dispatch_producer;
GRANT INSERT (queue, kind, args, priority, run_at, expire_at, max_attempts, idempotency_key, tenant)
    ON dispatch.jobs TO dispatch_producer;
GRANT SELECT, INSERT, UPDATE, DELETE ON dispatch.duties TO dispatch_worker;
-- New functions: EXECUTE for nobody but the worker (and the reader's masking), as schema.sql says.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.mask_text(text), dispatch.mask_secrets(jsonb) TO dispatch_reader;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
