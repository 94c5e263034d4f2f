-- The engine under review (the second review): a rescued request waits its own interval, bulk
-- revivals do what they can and say what they skipped, producers' mistakes are named plainly,
-- dead letters show their budget.

-- Rescue v3: as v2, but a request (kind http.request) backs off by its own attempt_interval,
-- as its retries do (the README's promise), not by its queue's backoff.
CREATE FUNCTION dispatch.rescue_expired_v3(max_jobs integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ids bigint[];
    tokens uuid[];
    waits double precision[];
    n integer;
BEGIN
    SELECT array_agg(s.id), array_agg(s.lease_token), array_agg(s.wait) INTO ids, tokens, waits
    FROM (SELECT j.id, j.lease_token,
                 CASE WHEN j.kind = 'http.request' AND jsonb_typeof(j.args -> 'attempt_interval') = 'number'
                      THEN least(greatest((j.args ->> 'attempt_interval')::double precision, 1), 1e7)
                      ELSE least(extract(epoch FROM q.backoff_cap),
                                 extract(epoch FROM q.backoff_base)
                                 * power(q.backoff_factor, least(greatest(j.attempt - 1, 0), 64)))
                           * (1 + q.backoff_jitter * (2 * random() - 1))
                 END AS wait
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

-- Workers of the previous release rescue the same way.
CREATE OR REPLACE FUNCTION dispatch.rescue_expired_v2(max_jobs integer DEFAULT 1000) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT dispatch.rescue_expired_v3(max_jobs)
$$;

-- Revive dead jobs under their original id with a fresh attempt budget, keeping what they had
-- (created_at, expire_at, the idempotency key), each on its own: one that cannot be revived is
-- skipped with the reason, and the others are revived. A row per job asked for.
CREATE FUNCTION dispatch.retry_dead_v2(job_ids bigint[], expire_at timestamptz DEFAULT NULL)
RETURNS TABLE (job_id bigint, revived boolean, reason text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    wanted bigint;
    d dispatch.dead_jobs;
    holder bigint;
BEGIN
    IF retry_dead_v2.expire_at IS NOT NULL AND retry_dead_v2.expire_at <= now() THEN
        RAISE EXCEPTION 'dispatch.retry_dead: the new expire_at % is already past', retry_dead_v2.expire_at
            USING ERRCODE = 'check_violation';
    END IF;
    FOR wanted IN SELECT DISTINCT x FROM unnest(job_ids) x WHERE x IS NOT NULL ORDER BY x LOOP
        SELECT * INTO d FROM dispatch.dead_jobs x WHERE x.job_id = wanted FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN QUERY SELECT wanted, false, CASE WHEN EXISTS (SELECT FROM dispatch.dead_jobs x WHERE x.job_id = wanted)
                                                    THEN 'being revived by someone else right now'
                                                    ELSE 'not a dead job' END;
            CONTINUE;
        END IF;
        IF retry_dead_v2.expire_at IS NULL AND d.expire_at IS NOT NULL AND d.expire_at <= now() THEN
            RETURN QUERY SELECT wanted, false, 'expired; give a new expire_at to revive it';
            CONTINUE;
        END IF;
        SELECT coalesce(j.id, k.job_id) INTO holder
        FROM (SELECT 1) one
        LEFT JOIN dispatch.jobs j ON j.queue = d.queue AND j.idempotency_key = d.idempotency_key
        LEFT JOIN dispatch.idempotency_keys k ON k.queue = d.queue AND k.key = d.idempotency_key
             AND k.job_id <> d.job_id AND k.expires_at > now();
        IF holder IS NOT NULL THEN
            RETURN QUERY SELECT wanted, false, format('its idempotency key %L is held by job %s', d.idempotency_key,
                                                      holder);
            CONTINUE;
        END IF;
        BEGIN  -- a subtransaction: what a capability's trigger refuses skips this job alone
            DELETE FROM dispatch.idempotency_keys k WHERE k.queue = d.queue AND k.key = d.idempotency_key;
            DELETE FROM dispatch.dead_jobs x WHERE x.job_id = wanted;
            INSERT INTO dispatch.jobs (id, queue, kind, args, priority, tenant, version, max_attempts,
                                       created_at, expire_at, idempotency_key)
            VALUES (d.job_id, d.queue, d.kind, d.args, d.priority, d.tenant, d.version, d.max_attempts,
                    d.created_at, coalesce(retry_dead_v2.expire_at, d.expire_at), d.idempotency_key);
            RETURN QUERY SELECT wanted, true, NULL::text;
        EXCEPTION WHEN unique_violation OR check_violation OR foreign_key_violation OR raise_exception THEN
            RETURN QUERY SELECT wanted, false, CASE
                WHEN SQLERRM LIKE '%deliveries_one_pending%'
                    THEN 'its lead is on its way to that integration again (a newer delivery): see leads show'
                ELSE SQLERRM END;
        END;
    END LOOP;
END $$;

-- retry_dead (v1) revives what it can, as v2, and returns the ids it revived; each job it skips
-- is named in a NOTICE (it used to refuse the whole batch, or fail on a raw constraint error).
CREATE OR REPLACE FUNCTION dispatch.retry_dead(job_ids bigint[], expire_at timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM dispatch.retry_dead_v2(job_ids, expire_at) LOOP
        IF r.revived THEN
            RETURN NEXT r.job_id;
        ELSE
            RAISE NOTICE 'dispatch.retry_dead: job % skipped: %', r.job_id, r.reason;
        END IF;
    END LOOP;
END $$;

-- enqueue: a queue that does not exist and a kind that breaks the rule are named plainly.
CREATE OR REPLACE FUNCTION dispatch.enqueue(
    kind            text,
    args            jsonb DEFAULT '{}',
    queue           text DEFAULT 'default',
    priority        integer DEFAULT 0,
    run_at          timestamptz DEFAULT NULL,
    expire_at       timestamptz DEFAULT NULL,
    max_attempts    integer DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    tenant          text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF kind IS NULL THEN
        RAISE EXCEPTION 'dispatch.enqueue: kind must not be null' USING ERRCODE = 'not_null_violation';
    END IF;
    IF kind !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'dispatch.enqueue: kind % breaks the naming rule (job_kind_format): a letter, digit or _ '
                        'first, then letters, digits and _ . : -, at most 128 characters', quote_literal(left(kind, 200))
            USING ERRCODE = 'check_violation', CONSTRAINT = 'job_kind_format';
    END IF;
    IF args IS NULL OR jsonb_typeof(args) <> 'object' THEN
        RAISE EXCEPTION 'dispatch.enqueue: args must be a JSON object, got %', coalesce(jsonb_typeof(args), 'null')
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (SELECT FROM dispatch.queues q WHERE q.name = coalesce(enqueue.queue, 'default')) THEN
        RAISE EXCEPTION 'dispatch.enqueue: no queue % (job_queue_must_exist_in_dispatch_queues): create it first '
                        'with pgdispatch queues create NAME, or INSERT INTO dispatch.queues (name) VALUES (...)',
                        quote_literal(left(enqueue.queue, 200))
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'job_queue_must_exist_in_dispatch_queues';
    END IF;
    INSERT INTO dispatch.jobs AS j (kind, args, queue, priority, run_at, expire_at, max_attempts,
                                    idempotency_key, tenant)
    VALUES (enqueue.kind, enqueue.args, coalesce(enqueue.queue, 'default'), coalesce(enqueue.priority, 0),
            coalesce(enqueue.run_at, now()), enqueue.expire_at, enqueue.max_attempts,
            enqueue.idempotency_key, enqueue.tenant)
    ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.id INTO new_id;
    IF new_id IS NOT NULL THEN
        RETURN new_id;
    END IF;
    -- The key is taken: by a live job, or by one finished within the dedupe window.
    SELECT j.id INTO new_id FROM dispatch.jobs j
    WHERE j.queue = coalesce(enqueue.queue, 'default') AND j.idempotency_key = enqueue.idempotency_key;
    IF new_id IS NULL THEN
        SELECT k.job_id INTO new_id FROM dispatch.idempotency_keys k
        WHERE k.queue = coalesce(enqueue.queue, 'default') AND k.key = enqueue.idempotency_key;
    END IF;
    RETURN new_id;
END $$;

-- Dead letters show the budget they had (the job's own, else its queue's) and when they expired.
CREATE OR REPLACE VIEW dispatch.dead_job_list AS
SELECT d.job_id, d.queue, d.kind, dispatch.mask_secrets(d.args) AS args, d.tenant, d.attempt,
       d.reason, d.last_error, d.last_status, d.created_at, d.died_at,
       coalesce(d.max_attempts, q.max_attempts) AS max_attempts, d.expire_at
FROM dispatch.dead_jobs d
LEFT JOIN dispatch.queues q ON q.name = d.queue;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
