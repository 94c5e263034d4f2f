-- The operators' console: accounts, sessions, its role, audited actions, cancellation, charts.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

DROP INDEX dispatch.dead_jobs_died_at;

-- -- Console accounts, sessions and failed logins ---------------------------------------------------

CREATE TABLE dispatch.console_users (
    name                text PRIMARY KEY
        CONSTRAINT console_user_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$'),
    role                text NOT NULL
        CONSTRAINT console_user_role_known CHECK (role IN ('viewer', 'operator', 'enterprise_admin', 'admin')),
    -- argon2id (PHC string); NULL: the account logs in only through the trusted proxy.
    password_hash       text CONSTRAINT console_user_password_is_argon2 CHECK (password_hash LIKE '$argon2%'),
    -- What an enterprise admin may see: CRM enterprises (numbers) and lead entities (ids).
    enterprises         text[] NOT NULL DEFAULT '{}',
    entities            bigint[] NOT NULL DEFAULT '{}',
    disabled            boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    password_changed_at timestamptz
);

CREATE TABLE dispatch.console_sessions (
    -- sha256 of the cookie's token: a stolen table gives no session.
    token_hash   bytea PRIMARY KEY,
    user_name    text NOT NULL REFERENCES dispatch.console_users (name) ON DELETE CASCADE ON UPDATE CASCADE,
    csrf_token   text NOT NULL,
    address      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_at ON dispatch.console_sessions (expires_at);
CREATE INDEX console_sessions_user ON dispatch.console_sessions (user_name);

CREATE TABLE dispatch.console_login_failures (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name text NOT NULL,
    address   text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_login_failures_user ON dispatch.console_login_failures (user_name, at);
CREATE INDEX console_login_failures_address ON dispatch.console_login_failures (address, at);
CREATE INDEX console_login_failures_at ON dispatch.console_login_failures (at);

-- Console accounts are changed through these (the CLI's `pgdispatch users`, the console's users
-- page): from the console, by an admin only; each change audited. A disabled account's sessions
-- end at once, and so do an account's other sessions when its password changes.
CREATE FUNCTION dispatch.console_require_admin() RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF dispatch.console_user() IS NOT NULL AND NOT EXISTS (
            SELECT FROM dispatch.console_users u WHERE u.name = dispatch.console_user()
            AND u.role = 'admin' AND NOT u.disabled) THEN
        RAISE EXCEPTION 'console user % may not manage accounts (admins may)', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END $$;

CREATE FUNCTION dispatch.add_console_user_v1(user_name text, role text, password_hash text, enterprises text[],
                                             entities bigint[], who text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch.console_require_admin();
    IF EXISTS (SELECT FROM dispatch.console_users u WHERE u.name = user_name) THEN
        RAISE EXCEPTION 'a console user named % exists already', user_name USING ERRCODE = 'unique_violation';
    END IF;
    INSERT INTO dispatch.console_users (name, role, password_hash, enterprises, entities)
    VALUES (user_name, role, password_hash, coalesce(enterprises, '{}'), coalesce(entities, '{}'));
    PERFORM dispatch.audit_v1(who, 'add user', 'console-user:' || user_name, NULL, jsonb_build_object(
        'role', role, 'enterprises', to_jsonb(coalesce(enterprises, '{}')), 'entities', to_jsonb(coalesce(entities, '{}'))));
END $$;

CREATE FUNCTION dispatch.disable_console_user_v1(user_name text, disabled boolean, who text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch.console_require_admin();
    UPDATE dispatch.console_users u SET disabled = disable_console_user_v1.disabled WHERE u.name = user_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no console user %', user_name USING ERRCODE = 'no_data_found';
    END IF;
    IF disabled THEN
        DELETE FROM dispatch.console_sessions s WHERE s.user_name = disable_console_user_v1.user_name;
    END IF;
    PERFORM dispatch.audit_v1(who, CASE WHEN disabled THEN 'disable user' ELSE 'enable user' END,
                              'console-user:' || user_name);
END $$;

CREATE FUNCTION dispatch.set_console_password_v1(user_name text, password_hash text, who text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch.console_require_admin();
    UPDATE dispatch.console_users u SET password_hash = set_console_password_v1.password_hash,
                                        password_changed_at = now()
    WHERE u.name = user_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no console user %', user_name USING ERRCODE = 'no_data_found';
    END IF;
    DELETE FROM dispatch.console_sessions s WHERE s.user_name = set_console_password_v1.user_name;
    PERFORM dispatch.audit_v1(who, 'set password', 'console-user:' || user_name);
END $$;

CREATE FUNCTION dispatch.delete_console_user_v1(user_name text, who text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM dispatch.console_require_admin();
    DELETE FROM dispatch.console_users u WHERE u.name = user_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no console user %', user_name USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM dispatch.audit_v1(who, 'delete user', 'console-user:' || user_name);
END $$;

-- The console user of this transaction (the console sets it with set_config(..., true) at the
-- start of every transaction); NULL for every other caller (the CLI, psql, an application).
CREATE FUNCTION dispatch.console_user() RETURNS text
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('pgdispatch.console_user', true), '') $$;

-- An enterprise admin sees their own enterprises and lead entities only: enforced in the SQL the
-- console runs (these predicates), not only by its Python.
CREATE FUNCTION dispatch.console_sees_enterprise(number text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN dispatch.console_user() IS NULL THEN true
                ELSE coalesce((SELECT NOT u.disabled AND (u.role <> 'enterprise_admin' OR number = ANY (u.enterprises))
                               FROM dispatch.console_users u WHERE u.name = dispatch.console_user()), false) END
$$;

CREATE FUNCTION dispatch.console_sees_entity(entity bigint) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN dispatch.console_user() IS NULL THEN true
                ELSE coalesce((SELECT NOT u.disabled AND (u.role <> 'enterprise_admin' OR entity = ANY (u.entities))
                               FROM dispatch.console_users u WHERE u.name = dispatch.console_user()), false) END
$$;

-- The same scope as a list, read once per query (a per-row call of the functions above costs a
-- few microseconds each): NULL = everything; else the enterprise admin's own (empty for an
-- unknown or disabled console user).
CREATE FUNCTION dispatch.console_entity_scope() RETURNS bigint[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN dispatch.console_user() IS NULL THEN NULL
                ELSE coalesce((SELECT CASE WHEN u.disabled THEN '{}'::bigint[]
                                           WHEN u.role = 'enterprise_admin' THEN u.entities END
                               FROM dispatch.console_users u WHERE u.name = dispatch.console_user()),
                              CASE WHEN EXISTS (SELECT FROM dispatch.console_users u
                                                WHERE u.name = dispatch.console_user()) THEN NULL
                                   ELSE '{}'::bigint[] END) END
$$;

CREATE FUNCTION dispatch.console_enterprise_scope() RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN dispatch.console_user() IS NULL THEN NULL
                ELSE coalesce((SELECT CASE WHEN u.disabled THEN '{}'::text[]
                                           WHEN u.role = 'enterprise_admin' THEN u.enterprises END
                               FROM dispatch.console_users u WHERE u.name = dispatch.console_user()),
                              CASE WHEN EXISTS (SELECT FROM dispatch.console_users u
                                                WHERE u.name = dispatch.console_user()) THEN NULL
                                   ELSE '{}'::text[] END) END
$$;

-- A credential is an enterprise admin's when it serves one of their entities.
CREATE FUNCTION dispatch.console_sees_credential(credential_id bigint) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN dispatch.console_user() IS NULL THEN true
                WHEN (SELECT u.role FROM dispatch.console_users u WHERE u.name = dispatch.console_user()
                      AND NOT u.disabled) IS DISTINCT FROM 'enterprise_admin'
                     THEN EXISTS (SELECT FROM dispatch.console_users u
                                  WHERE u.name = dispatch.console_user() AND NOT u.disabled)
                ELSE EXISTS (SELECT FROM dispatch.entity_credentials ec
                             WHERE ec.credential_id = console_sees_credential.credential_id
                               AND dispatch.console_sees_entity(ec.external_entity_id)) END
$$;

-- Whether the console user may act on the engine (queues, jobs, dead letters, limits, commands,
-- processes): operators and admins.
CREATE FUNCTION dispatch.console_may_operate() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT dispatch.console_user() IS NULL
        OR EXISTS (SELECT FROM dispatch.console_users u WHERE u.name = dispatch.console_user()
                   AND NOT u.disabled AND u.role IN ('operator', 'admin'))
$$;

-- For the engine actions whose functions predate the console (commands, processes): their
-- queries call this first, so a console viewer is refused by the database too.
CREATE FUNCTION dispatch.console_require_operator() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not do that (operators and admins may)', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN true;
END $$;

-- Whether the console user may act on CRM and lead settings (then within their scope):
-- operators, admins and enterprise admins.
CREATE FUNCTION dispatch.console_may_act() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT dispatch.console_user() IS NULL
        OR EXISTS (SELECT FROM dispatch.console_users u WHERE u.name = dispatch.console_user()
                   AND NOT u.disabled AND u.role IN ('operator', 'admin', 'enterprise_admin'))
$$;

-- -- Cancellation ------------------------------------------------------------------------------------

-- Cancel jobs, queued or running. Each ends at once in dead_jobs as 'cancelled' with who and why
-- (its history says so too); a running one's lease is gone with its row, so whatever its worker
-- writes later changes nothing, and the worker that holds it is told (a NOTIFY on
-- dispatch_cancel) and cancels the executor within about a second (at the latest at its next
-- heartbeat, which finds the lease gone). A process's step job cancels its instance into
-- 'error' with the reason. One row per id asked for: cancelled, or skipped with the reason.
CREATE FUNCTION dispatch.cancel_jobs_v1(ids bigint[], reason text, who text)
RETURNS TABLE (job_id bigint, cancelled boolean, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    why text := format('cancelled by %s: %s', coalesce(nullif(btrim(who), ''), session_user::text),
                       coalesce(nullif(btrim(reason), ''), 'no reason given'));
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not cancel jobs', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.cancelled_jobs (
        id bigint, queue text, kind text, args jsonb, was_running boolean, leased_by text, lease_token uuid
    ) ON COMMIT DROP;
    TRUNCATE pg_temp.cancelled_jobs;
    WITH asked AS (
        SELECT DISTINCT a.id FROM unnest(ids) a (id) WHERE a.id IS NOT NULL
    ), locked AS (
        SELECT j.id FROM dispatch.jobs j JOIN asked a ON a.id = j.id ORDER BY j.id FOR UPDATE OF j
    ), gone AS (
        DELETE FROM dispatch.jobs j USING locked l WHERE j.id = l.id RETURNING j.*
    ), buried AS (
        INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, tenant, idempotency_key,
            version, attempt, max_attempts, reason, last_error, created_at, expire_at)
        SELECT g.id, g.queue, g.kind, g.args, g.priority, g.tenant, g.idempotency_key, g.version,
               g.attempt, g.max_attempts, 'cancelled', why, g.created_at, g.expire_at
        FROM gone g
        ON CONFLICT (job_id) DO UPDATE SET reason = 'cancelled', last_error = excluded.last_error,
            attempt = excluded.attempt, died_at = now()
    ), logged AS (
        INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, tenant, outcome, error, worker, started_at)
        SELECT g.id, g.attempt, g.queue, g.kind, g.tenant, 'dead', why, g.leased_by, g.leased_at FROM gone g
    )
    INSERT INTO pg_temp.cancelled_jobs
    SELECT g.id, g.queue, g.kind, g.args, g.state = 'running', g.leased_by, g.lease_token FROM gone g;

    -- The workers that hold the running ones: one message per worker and 100 leases (a NOTIFY
    -- carries at most 8,000 bytes).
    PERFORM pg_notify('dispatch_cancel', jsonb_build_object('worker', w.leased_by, 'tokens', w.tokens)::text)
    FROM (SELECT c.leased_by, jsonb_agg(c.lease_token) AS tokens
          FROM (SELECT c.*, (row_number() OVER (PARTITION BY c.leased_by ORDER BY c.id) - 1) / 100 AS chunk
                FROM pg_temp.cancelled_jobs c WHERE c.was_running) c
          GROUP BY c.leased_by, c.chunk) w;

    -- Process step jobs: their instance stops in 'error' with the reason (restart it to go on).
    WITH steps AS (
        SELECT (c.args ->> 'process_id')::bigint AS process_id, (c.args ->> 'run_seq')::integer AS run_seq
        FROM pg_temp.cancelled_jobs c
        WHERE c.kind LIKE 'process:%' AND c.args ->> 'process_id' ~ '^[0-9]{1,18}$'
          AND c.args ->> 'run_seq' ~ '^[0-9]{1,9}$'
    ), stopped AS (
        UPDATE dispatch.processes p SET status = 'error', error = why, updated_at = now()
        FROM steps s
        WHERE p.id = s.process_id AND p.run_seq = s.run_seq AND p.status IN ('pending', 'retry', 'running')
        RETURNING p.id, p.current_step, p.attempts, p.version
    )
    INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, version)
    SELECT s.id, s.current_step, s.attempts, 'operator', why, s.version FROM stopped s;

    PERFORM dispatch.audit_jobs_v1(who, 'cancel', (SELECT array_agg(c.id ORDER BY c.id) FROM pg_temp.cancelled_jobs c),
                                   reason);

    RETURN QUERY
    SELECT a.id,
           c.id IS NOT NULL,
           CASE WHEN c.id IS NULL AND EXISTS (SELECT FROM dispatch.dead_jobs d WHERE d.job_id = a.id)
                    THEN 'already dead (see dead letters)'
                WHEN c.id IS NULL THEN 'not a live job (finished, or no such job)'
                WHEN c.was_running THEN format('was running on %s: its worker stops it', c.leased_by)
                ELSE 'was waiting in ' || c.queue END
    FROM (SELECT DISTINCT x.id FROM unnest(ids) x (id) WHERE x.id IS NOT NULL) a
    LEFT JOIN pg_temp.cancelled_jobs c ON c.id = a.id
    ORDER BY a.id;
END $$;

-- A producer cancels what it named: the live job of an idempotency key in a queue (the order
-- was cancelled: its pending webhook goes too). Returns the job's id, NULL when none is live.
CREATE FUNCTION dispatch.cancel_job_by_key(queue text, idempotency_key text, reason text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found_id bigint;
BEGIN
    SELECT j.id INTO found_id FROM dispatch.jobs j
    WHERE j.queue = cancel_job_by_key.queue AND j.idempotency_key = cancel_job_by_key.idempotency_key;
    IF found_id IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM dispatch.cancel_jobs_v1(ARRAY[found_id], reason, session_user::text) c WHERE c.cancelled;
    RETURN CASE WHEN FOUND THEN found_id END;
END $$;

-- -- Operators' actions that were plain statements: now functions, audited ---------------------------

CREATE FUNCTION dispatch.pause_queue_v1(queue_name text, paused boolean, who text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not change queues', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE dispatch.queues q SET paused = pause_queue_v1.paused WHERE q.name = queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no queue %', queue_name USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM dispatch.audit_v1(who, CASE WHEN paused THEN 'pause' ELSE 'resume' END, 'queue:' || queue_name, reason);
    RETURN true;
END $$;

-- Change a queue's policy: `changes` names what changes (seconds for durations; concurrency 0
-- or null: no cap). Unknown or ill-typed settings are refused, naming them.
CREATE FUNCTION dispatch.update_queue_v1(queue_name text, changes jsonb, who text, reason text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    unknown text;
    bad text;
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not change queues', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(changes) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'queue settings must be a JSON object' USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(k, ', ') INTO unknown FROM jsonb_object_keys(changes) k
    WHERE k NOT IN ('max_attempts', 'backoff_base', 'backoff_factor', 'backoff_cap', 'backoff_jitter',
                    'job_timeout', 'concurrency', 'dedupe_window');
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'unknown queue settings: % (known: max_attempts, backoff_base, backoff_factor, '
            'backoff_cap, backoff_jitter, job_timeout, concurrency, dedupe_window)', unknown
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(e.key, ', ') INTO bad FROM jsonb_each(changes) e
    WHERE jsonb_typeof(e.value) NOT IN ('number', 'null')
       OR (e.key = 'concurrency' AND jsonb_typeof(e.value) = 'number' AND (e.value)::numeric < 0)
       OR (e.key <> 'concurrency' AND jsonb_typeof(e.value) = 'null');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'queue settings % must be numbers (seconds for durations; concurrency 0 for no cap)', bad
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE dispatch.queues q SET
        max_attempts = coalesce((changes ->> 'max_attempts')::integer, q.max_attempts),
        backoff_base = coalesce(make_interval(secs => (changes ->> 'backoff_base')::float8), q.backoff_base),
        backoff_factor = coalesce((changes ->> 'backoff_factor')::float8, q.backoff_factor),
        backoff_cap = coalesce(make_interval(secs => (changes ->> 'backoff_cap')::float8), q.backoff_cap),
        backoff_jitter = coalesce((changes ->> 'backoff_jitter')::float8, q.backoff_jitter),
        job_timeout = coalesce(make_interval(secs => (changes ->> 'job_timeout')::float8), q.job_timeout),
        concurrency = CASE WHEN NOT changes ? 'concurrency' THEN q.concurrency
                           WHEN coalesce((changes ->> 'concurrency')::integer, 0) = 0 THEN NULL
                           ELSE (changes ->> 'concurrency')::integer END,
        dedupe_window = coalesce(make_interval(secs => (changes ->> 'dedupe_window')::float8), q.dedupe_window)
    WHERE q.name = queue_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no queue %', queue_name USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM dispatch.audit_v1(who, 'set', 'queue:' || queue_name, reason, changes);
END $$;

-- Create or change a shared limit rule: the settings `changes` names replace the rule's (null
-- clears one); the others stay. Returns true when the rule is new.
CREATE FUNCTION dispatch.set_limit_v1(limit_key text, changes jsonb, who text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    unknown text;
    created boolean;
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not change limits', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(changes) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'limit settings must be a JSON object' USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(k, ', ') INTO unknown FROM jsonb_object_keys(changes) k
    WHERE k NOT IN ('rate', 'burst', 'concurrency', 'breaker_failures', 'breaker_cooldown', 'note');
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'unknown limit settings: % (known: rate, burst, concurrency, breaker_failures, '
            'breaker_cooldown, note)', unknown USING ERRCODE = 'check_violation';
    END IF;
    IF EXISTS (SELECT FROM jsonb_each(changes) e WHERE e.key <> 'note' AND jsonb_typeof(e.value) NOT IN ('number', 'null')) THEN
        RAISE EXCEPTION 'limit settings must be numbers (breaker_cooldown in seconds), or null to clear'
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE dispatch.limits l SET
        rate = CASE WHEN changes ? 'rate' THEN (changes ->> 'rate')::double precision ELSE l.rate END,
        burst = CASE WHEN changes ? 'burst' THEN (changes ->> 'burst')::integer ELSE l.burst END,
        concurrency = CASE WHEN changes ? 'concurrency' THEN (changes ->> 'concurrency')::integer ELSE l.concurrency END,
        breaker_failures = CASE WHEN changes ? 'breaker_failures' THEN (changes ->> 'breaker_failures')::integer
                                ELSE l.breaker_failures END,
        breaker_cooldown = CASE WHEN changes ? 'breaker_cooldown'
                                THEN make_interval(secs => (changes ->> 'breaker_cooldown')::float8)
                                ELSE l.breaker_cooldown END,
        note = CASE WHEN changes ? 'note' THEN changes ->> 'note' ELSE l.note END
    WHERE l.key = limit_key;
    created := NOT FOUND;
    IF created THEN
        INSERT INTO dispatch.limits (key, rate, burst, concurrency, breaker_failures, breaker_cooldown, note)
        VALUES (limit_key, (changes ->> 'rate')::double precision, (changes ->> 'burst')::integer,
                (changes ->> 'concurrency')::integer, (changes ->> 'breaker_failures')::integer,
                make_interval(secs => (changes ->> 'breaker_cooldown')::float8), changes ->> 'note');
    END IF;
    PERFORM dispatch.audit_v1(who, CASE WHEN created THEN 'create' ELSE 'set' END, 'limit:' || limit_key, reason, changes);
    RETURN created;
END $$;

CREATE FUNCTION dispatch.delete_limit_v1(limit_key text, who text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not change limits', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    DELETE FROM dispatch.limits l WHERE l.key = limit_key;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM dispatch.audit_v1(who, 'delete', 'limit:' || limit_key, reason);
    RETURN true;
END $$;

-- Close a breaker and clear a pause (dispatch.reset_limit_v2), audited.
CREATE FUNCTION dispatch.reset_limit_v3(limit_key text, who text, reason text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    back integer;
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not change limits', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    back := dispatch.reset_limit_v2(limit_key);
    PERFORM dispatch.audit_v1(who, 'reset', 'limit:' || limit_key, reason, jsonb_build_object('jobs_back', back));
    RETURN back;
END $$;

-- Retry dead jobs (dispatch.retry_dead_v2, one row per id, revived or skipped with why), audited.
CREATE FUNCTION dispatch.retry_dead_v3(job_ids bigint[], expire_at timestamptz, who text, why text DEFAULT NULL)
RETURNS TABLE (job_id bigint, revived boolean, reason text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not retry dead jobs', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.retried_dead (job_id bigint, revived boolean, reason text) ON COMMIT DROP;
    TRUNCATE pg_temp.retried_dead;
    INSERT INTO pg_temp.retried_dead SELECT r.job_id, r.revived, r.reason
    FROM dispatch.retry_dead_v2(job_ids, expire_at => retry_dead_v3.expire_at) r;
    PERFORM dispatch.audit_jobs_v1(who, 'retry',
        (SELECT array_agg(r.job_id ORDER BY r.job_id) FROM pg_temp.retried_dead r WHERE r.revived), why);
    RETURN QUERY SELECT r.job_id, r.revived, r.reason FROM pg_temp.retried_dead r ORDER BY r.job_id;
END $$;

-- Purge dead jobs for good, one row per id: purged, or skipped with why.
CREATE FUNCTION dispatch.purge_dead_v1(job_ids bigint[], who text, why text DEFAULT NULL)
RETURNS TABLE (job_id bigint, purged boolean, reason text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    purged_ids bigint[];
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not purge dead jobs', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    WITH gone AS (DELETE FROM dispatch.dead_jobs d WHERE d.job_id = ANY (job_ids) RETURNING d.job_id)
    SELECT coalesce(array_agg(g.job_id ORDER BY g.job_id), '{}') INTO purged_ids FROM gone g;
    PERFORM dispatch.audit_jobs_v1(who, 'purge', purged_ids, why);
    RETURN QUERY
    SELECT a.id, a.id = ANY (purged_ids), CASE WHEN NOT a.id = ANY (purged_ids) THEN 'not a dead job' END
    FROM (SELECT DISTINCT x.id FROM unnest(job_ids) x (id) WHERE x.id IS NOT NULL) a ORDER BY a.id;
END $$;

-- Run queued jobs now (their run_at moves to now; a running one is left alone).
CREATE FUNCTION dispatch.run_jobs_now_v1(ids bigint[], who text)
RETURNS TABLE (job_id bigint, moved boolean, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    moved_ids bigint[];
    queues text[];
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not run jobs', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    WITH moved AS (
        UPDATE dispatch.jobs j SET run_at = now(), state = 'available', parked_at = NULL
        WHERE j.id = ANY (ids) AND j.state <> 'running'
        RETURNING j.id, j.queue
    )
    SELECT coalesce(array_agg(m.id), '{}'), coalesce(array_agg(DISTINCT m.queue), '{}') INTO moved_ids, queues
    FROM moved m;
    PERFORM pg_notify('dispatch_jobs', q) FROM unnest(queues) q;
    PERFORM dispatch.audit_jobs_v1(who, 'run now', moved_ids);
    RETURN QUERY
    SELECT a.id, a.id = ANY (moved_ids),
           CASE WHEN a.id = ANY (moved_ids) THEN 'runs now'
                WHEN EXISTS (SELECT FROM dispatch.jobs j WHERE j.id = a.id) THEN 'already running'
                ELSE 'not a live job' END
    FROM (SELECT DISTINCT x.id FROM unnest(ids) x (id) WHERE x.id IS NOT NULL) a
    ORDER BY a.id;
END $$;

-- Run a periodic command now (even when disabled; never beside its own run), audited. Returns
-- the job's id, NULL when its previous run is still queued or running.
CREATE FUNCTION dispatch.run_command_v1(command_key text, who text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    made bigint;
BEGIN
    IF NOT dispatch.console_may_operate() THEN
        RAISE EXCEPTION 'console user % may not run commands', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT FROM dispatch.commands c WHERE c.key = command_key) THEN
        RAISE EXCEPTION 'no command %', command_key USING ERRCODE = 'no_data_found';
    END IF;
    made := dispatch.schedule_command_v2(command_key, now(), NULL, true);
    IF made IS NOT NULL THEN
        PERFORM dispatch.audit_v1(who, 'run now', 'command:' || command_key, NULL, jsonb_build_object('job_id', made));
    END IF;
    RETURN made;
END $$;

-- Resend leads (dispatch.resend_leads), audited; an enterprise admin's leads only (the others
-- are named in the errors, as missing ones are).
CREATE FUNCTION dispatch.resend_leads_v2(lead_ids bigint[], types text[], who text)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    theirs bigint[];
    foreign_ids bigint[];
    summary jsonb;
BEGIN
    IF NOT dispatch.console_may_act() THEN
        RAISE EXCEPTION 'console user % may not send leads', dispatch.console_user()
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT coalesce(array_agg(r.id ORDER BY r.ord) FILTER (WHERE l.id IS NULL OR dispatch.console_sees_entity(l.external_entity_id)), '{}'),
           coalesce(array_agg(r.id ORDER BY r.ord) FILTER (WHERE l.id IS NOT NULL AND NOT dispatch.console_sees_entity(l.external_entity_id)), '{}')
    INTO theirs, foreign_ids
    FROM unnest(lead_ids) WITH ORDINALITY r (id, ord) LEFT JOIN dispatch.leads l ON l.id = r.id;
    summary := dispatch.resend_leads(theirs, types);
    IF cardinality(foreign_ids) > 0 THEN
        summary := summary || jsonb_build_object(
            'total_count', (summary ->> 'total_count')::integer + cardinality(foreign_ids),
            'errors_count', (summary ->> 'errors_count')::integer + cardinality(foreign_ids),
            'errors', (summary -> 'errors') || (SELECT jsonb_agg(jsonb_build_object('lead_id', f, 'error',
                           format('lead %s is not one of your entities', f))) FROM unnest(foreign_ids) f));
    END IF;
    PERFORM dispatch.audit_v1(who, 'resend', 'leads', NULL, jsonb_build_object(
        'lead_ids', to_jsonb(theirs), 'types', to_jsonb(types), 'batches', summary -> 'batches'));
    RETURN summary;
END $$;

-- A connection test run by a worker (which holds the secrets and the destination policy): a job
-- of kind credential.test (queue leads) or crm.test (queue crm), whose outcome is the answer.
CREATE FUNCTION dispatch.test_credential_v1(credential_id bigint, who text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    made bigint;
BEGIN
    IF NOT dispatch.console_may_act() OR NOT dispatch.console_sees_credential(credential_id) THEN
        RAISE EXCEPTION 'console user % may not test credential %', dispatch.console_user(), credential_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT FROM dispatch.credentials c WHERE c.id = credential_id) THEN
        RAISE EXCEPTION 'no credential %', credential_id USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO dispatch.jobs (queue, kind, args, max_attempts)
    VALUES ('leads', 'credential.test', jsonb_build_object('credential_id', credential_id), 1)
    RETURNING id INTO made;
    PERFORM dispatch.audit_v1(who, 'test', 'credential:' || credential_id, NULL, jsonb_build_object('job_id', made));
    RETURN made;
END $$;

CREATE FUNCTION dispatch.test_integration_v1(enterprise_number text, integration text, who text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    made bigint;
BEGIN
    IF NOT dispatch.console_may_act() OR NOT dispatch.console_sees_enterprise(enterprise_number) THEN
        RAISE EXCEPTION 'console user % may not test enterprise %', dispatch.console_user(), enterprise_number
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT EXISTS (SELECT FROM dispatch.enterprises e WHERE e.number = enterprise_number
                   AND e.integrations_config ? integration) THEN
        RAISE EXCEPTION 'enterprise % has no % integration', enterprise_number, integration
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO dispatch.jobs (queue, kind, args, max_attempts, tenant)
    VALUES ('crm', 'crm.test', jsonb_build_object('enterprise', enterprise_number, 'integration', integration), 1,
            'enterprise:' || enterprise_number)
    RETURNING id INTO made;
    PERFORM dispatch.audit_v1(who, 'test', format('enterprise:%s:%s', enterprise_number, integration), NULL,
                              jsonb_build_object('job_id', made));
    RETURN made;
END $$;

CREATE FUNCTION dispatch.enable_credential_v1(credential_id bigint, enabled boolean, who text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT dispatch.console_may_act() OR NOT dispatch.console_sees_credential(credential_id) THEN
        RAISE EXCEPTION 'console user % may not change credential %', dispatch.console_user(), credential_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    UPDATE dispatch.credentials c SET enabled = enable_credential_v1.enabled WHERE c.id = credential_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no credential %', credential_id USING ERRCODE = 'no_data_found';
    END IF;
    PERFORM dispatch.audit_v1(who, CASE WHEN enabled THEN 'enable' ELSE 'disable' END,
                              'credential:' || credential_id, reason);
    RETURN true;
END $$;

-- Merge `changes` into one CRM's config of an enterprise (null removes a field; a new
-- integration starts disabled, a new enterprise is created); the config trigger checks the
-- result. Returns the new config, its secrets masked. An enterprise admin may change their own
-- enterprises only.
CREATE FUNCTION dispatch.set_enterprise_integration_v1(enterprise_number text, integration text, changes jsonb,
                                                       who text, reason text DEFAULT NULL,
                                                       enterprise_name text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    config jsonb;
    merged jsonb;
BEGIN
    IF NOT dispatch.console_may_act() OR NOT dispatch.console_sees_enterprise(enterprise_number) THEN
        RAISE EXCEPTION 'console user % may not change enterprise %', dispatch.console_user(), enterprise_number
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF jsonb_typeof(changes) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'the changes must be a JSON object' USING ERRCODE = 'check_violation';
    END IF;
    SELECT e.integrations_config INTO config FROM dispatch.enterprises e WHERE e.number = enterprise_number FOR UPDATE;
    merged := jsonb_strip_nulls(coalesce(config -> integration, '{"enabled": false}') || changes);
    IF config IS NULL THEN
        INSERT INTO dispatch.enterprises (number, name, integrations_config)
        VALUES (enterprise_number, coalesce(enterprise_name, enterprise_number), jsonb_build_object(integration, merged))
        RETURNING integrations_config INTO config;
    ELSE
        UPDATE dispatch.enterprises e SET integrations_config = e.integrations_config || jsonb_build_object(integration, merged)
        WHERE e.number = enterprise_number RETURNING e.integrations_config INTO config;
    END IF;
    PERFORM dispatch.audit_v1(who, 'configure', format('enterprise:%s:%s', enterprise_number, integration), reason,
                              dispatch.mask_integrations(jsonb_build_object(integration, changes)));
    RETURN dispatch.mask_integrations(config);
END $$;

-- Close an enterprise CRM's breaker and lift its pause (every key of its shared limit: the rule's
-- and each host's), audited; an enterprise admin for their own enterprises only.
CREATE FUNCTION dispatch.reset_integration_v1(enterprise_number text, integration text, who text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    prefix text := dispatch.crm_limit_key(enterprise_number, integration);
    k text;
    back integer := 0;
BEGIN
    IF NOT dispatch.console_may_act() OR NOT dispatch.console_sees_enterprise(enterprise_number) THEN
        RAISE EXCEPTION 'console user % may not change enterprise %', dispatch.console_user(), enterprise_number
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    FOR k IN SELECT s.key FROM dispatch.limit_state s
             WHERE s.key = prefix OR s.key LIKE replace(replace(prefix, '%', '\%'), '_', '\_') || '|%' LOOP
        back := back + dispatch.reset_limit_v2(k);
    END LOOP;
    PERFORM dispatch.audit_v1(who, 'reset', format('enterprise:%s:%s', enterprise_number, integration));
    RETURN back;
END $$;

-- -- Outcomes per minute, for the console's charts ---------------------------------------------------
-- Counted as outcomes are written (one statement per batch), in a few shards per minute so that
-- two workers' batches rarely wait on one row; read by summing a day's rows at most.

CREATE TABLE dispatch.history_minutes (
    minute  timestamptz NOT NULL,
    queue   text NOT NULL,
    outcome text NOT NULL,
    shard   smallint NOT NULL,
    jobs    bigint NOT NULL,
    PRIMARY KEY (minute, queue, outcome, shard)
);

CREATE FUNCTION dispatch.count_history_minutes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.history_minutes AS m (minute, queue, outcome, shard, jobs)
    SELECT date_trunc('minute', a.finished_at), a.queue, a.outcome, (pg_backend_pid() % 4)::smallint, count(*)
    FROM added a
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3  -- one lock order for every writer
    ON CONFLICT (minute, queue, outcome, shard) DO UPDATE SET jobs = m.jobs + excluded.jobs;
    RETURN NULL;
END $$;

CREATE TRIGGER job_history_count_minutes AFTER INSERT ON dispatch.job_history
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION dispatch.count_history_minutes();

-- The last day of the history there is, counted once at the upgrade.
INSERT INTO dispatch.history_minutes (minute, queue, outcome, shard, jobs)
SELECT date_trunc('minute', h.finished_at), h.queue, h.outcome, 0, count(*)
FROM dispatch.job_history h WHERE h.finished_at > now() - interval '1 day'
GROUP BY 1, 2, 3;

CREATE FUNCTION dispatch.prune_history_minutes_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT m.minute, m.queue, m.outcome, m.shard FROM dispatch.history_minutes m
        WHERE m.minute < now() - keep ORDER BY m.minute LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.history_minutes m USING old o
        WHERE (m.minute, m.queue, m.outcome, m.shard) = (o.minute, o.queue, o.outcome, o.shard) RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

CREATE FUNCTION dispatch.prune_console_sessions_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT s.token_hash FROM dispatch.console_sessions s
        WHERE s.expires_at < now() - keep ORDER BY s.expires_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.console_sessions s USING old o WHERE s.token_hash = o.token_hash RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

CREATE FUNCTION dispatch.prune_console_login_failures_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT f.id FROM dispatch.console_login_failures f WHERE f.at < now() - keep ORDER BY f.at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.console_login_failures f USING old o WHERE f.id = o.id RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

INSERT INTO dispatch.retention (name, prune, keep, note) VALUES
    ('history_minutes', 'dispatch.prune_history_minutes_v1(interval, integer)', '8 days',
     'outcomes per minute, for the console''s charts'),
    ('console_sessions', 'dispatch.prune_console_sessions_v1(interval, integer)', '1 day',
     'console sessions, a day after they expired'),
    ('console_login_failures', 'dispatch.prune_console_login_failures_v1(interval, integer)', '1 day',
     'failed console logins (they slow down the next tries for 15 minutes)');

-- -- Views the console reads --------------------------------------------------------------------------

-- Every attempt of a job as the reader sees it (errors masked).
CREATE VIEW dispatch.job_attempts AS
SELECT h.job_id, h.attempt, h.queue, h.kind, h.tenant, h.outcome, dispatch.mask_text(h.error) AS error,
       h.status, h.worker, h.started_at, h.finished_at,
       extract(epoch FROM h.finished_at - h.started_at)::double precision AS seconds
FROM dispatch.job_history h;

-- Console accounts without their password hashes.
CREATE VIEW dispatch.console_user_list AS
SELECT u.name, u.role, u.enterprises, u.entities, u.disabled, u.password_hash IS NOT NULL AS has_password,
       u.created_at, u.password_changed_at,
       (SELECT max(s.last_seen_at) FROM dispatch.console_sessions s WHERE s.user_name = u.name) AS last_seen_at
FROM dispatch.console_users u;

-- The planner's estimate of a query's rows (EXPLAIN, not a count): for the console's counts of
-- big tables. Internal: called with constant text and quoted literals only.
CREATE FUNCTION dispatch.estimated_rows(query text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$  -- volatile: EXPLAIN runs only there
DECLARE
    plan jsonb;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || query INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric::bigint;
END $$;

-- Each queue at a glance, at a constant cost however big the backlog: counts exact up to `cap`
-- (an index range read no further), the planner's estimate beyond it (exact = false). The next
-- job to run (in claim order) and since when it may run; jobs finished per outcome in the last hour.
CREATE FUNCTION dispatch.console_queues_v1(cap integer DEFAULT 1000)
RETURNS TABLE (queue text, paused boolean, concurrency integer, max_attempts integer, job_timeout interval,
               available bigint, available_exact boolean, scheduled bigint, scheduled_exact boolean,
               running bigint, dead bigint, dead_exact boolean, next_since timestamptz,
               completed_hour bigint, failed_hour bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    q dispatch.queues;
    n_available bigint;
    n_scheduled bigint;
    n_dead bigint;
BEGIN
    FOR q IN SELECT * FROM dispatch.queues ORDER BY name LOOP
        SELECT count(*) INTO n_available FROM (
            SELECT 1 FROM dispatch.jobs j WHERE j.queue = q.name AND j.state = 'available' LIMIT cap + 1) x;
        SELECT count(*) INTO n_scheduled FROM (
            SELECT 1 FROM dispatch.jobs j WHERE j.queue = q.name AND j.state = 'scheduled' LIMIT cap + 1) x;
        SELECT count(*) INTO n_dead FROM (
            SELECT 1 FROM dispatch.dead_jobs d WHERE d.queue = q.name LIMIT cap + 1) x;
        RETURN QUERY SELECT
            q.name, q.paused, q.concurrency, q.max_attempts, q.job_timeout,
            CASE WHEN n_available > cap THEN greatest(cap + 1, dispatch.estimated_rows(format(
                'SELECT 1 FROM dispatch.jobs WHERE queue = %L AND state = %L', q.name, 'available')))
                 ELSE n_available END,
            n_available <= cap,
            CASE WHEN n_scheduled > cap THEN greatest(cap + 1, dispatch.estimated_rows(format(
                'SELECT 1 FROM dispatch.jobs WHERE queue = %L AND state = %L', q.name, 'scheduled')))
                 ELSE n_scheduled END,
            n_scheduled <= cap,
            (SELECT count(*) FROM dispatch.jobs j WHERE j.state = 'running' AND j.queue = q.name),
            CASE WHEN n_dead > cap THEN greatest(cap + 1, dispatch.estimated_rows(format(
                'SELECT 1 FROM dispatch.dead_jobs WHERE queue = %L', q.name)))
                 ELSE n_dead END,
            n_dead <= cap,
            (SELECT j.run_at FROM dispatch.jobs j WHERE j.queue = q.name AND j.state = 'available'
             ORDER BY j.priority, j.run_at, j.id LIMIT 1),
            (SELECT coalesce(sum(m.jobs), 0) FROM dispatch.history_minutes m
             WHERE m.queue = q.name AND m.minute > now() - interval '1 hour' AND m.outcome = 'completed')::bigint,
            (SELECT coalesce(sum(m.jobs), 0) FROM dispatch.history_minutes m
             WHERE m.queue = q.name AND m.minute > now() - interval '1 hour'
               AND m.outcome IN ('retried', 'dead'))::bigint;
    END LOOP;
END $$;

-- Outcomes per bucket (a minute over the last hour, an hour over the last day), for charts.
CREATE FUNCTION dispatch.console_throughput_v1(span interval, bucket interval)
RETURNS TABLE (at timestamptz, completed bigint, failed bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.at,
           coalesce(sum(m.jobs) FILTER (WHERE m.outcome = 'completed'), 0)::bigint,
           coalesce(sum(m.jobs) FILTER (WHERE m.outcome IN ('retried', 'dead')), 0)::bigint
    FROM generate_series(date_bin(bucket, now() - span, timestamptz '2000-01-01') + bucket,
                         date_bin(bucket, now(), timestamptz '2000-01-01'), bucket) b (at)
    LEFT JOIN dispatch.history_minutes m ON m.minute >= b.at AND m.minute < b.at + bucket
    GROUP BY b.at ORDER BY b.at
$$;

-- -- The console's reads of tables its role may not read (raw args, configs, history) -----------
-- Each returns what the reader's views would show (masked), bounded: a page below a cursor, at
-- most scan_rows rows read beyond it by the index that orders the page, every other filter applied
-- to those (so a filter that matches little costs a constant, never a walk of the table), and
-- how far it looked (scanned: rows read; lowest: the last key read, where to look further).

-- Live jobs, newest first. A row with a NULL id carries the figures when nothing matched.
CREATE FUNCTION dispatch.console_jobs_v1(queue_is text, kind_is text, tenant_is text, state_is text,
                                         args_contain jsonb, before_id bigint, scan_rows integer, page_rows integer)
RETURNS TABLE (id bigint, queue text, kind text, state text, attempt integer, max_attempts integer, tenant text,
               priority smallint, run_at timestamptz, created_at timestamptz, last_error text, leased_by text,
               scanned bigint, lowest bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH scanned AS MATERIALIZED (
        SELECT j.id, j.queue, j.kind, j.tenant, j.state, j.parked_at, j.run_at, j.args FROM dispatch.jobs j
        WHERE before_id IS NULL OR j.id < before_id
        ORDER BY j.id DESC LIMIT scan_rows
    ), figures AS (
        SELECT count(*) AS scanned, min(s.id) AS lowest FROM scanned s
    ), matched AS (
        SELECT s.id FROM scanned s
        WHERE (queue_is IS NULL OR s.queue = queue_is)
          AND (kind_is IS NULL OR s.kind = kind_is)
          AND (tenant_is IS NULL OR s.tenant = tenant_is)
          AND (state_is IS NULL OR CASE state_is
                WHEN 'running' THEN s.state = 'running'
                WHEN 'parked' THEN s.state <> 'running' AND s.parked_at IS NOT NULL
                WHEN 'scheduled' THEN s.state <> 'running' AND s.parked_at IS NULL AND s.run_at > now()
                ELSE s.state <> 'running' AND s.parked_at IS NULL AND s.run_at <= now() END)
          AND (args_contain IS NULL OR s.args @> args_contain)
        ORDER BY s.id DESC LIMIT page_rows
    )
    SELECT l.id, l.queue, l.kind, l.state, l.attempt, l.max_attempts, l.tenant, l.priority, l.run_at, l.created_at,
           l.last_error, l.leased_by, f.scanned, f.lowest
    FROM figures f
    LEFT JOIN (matched m JOIN dispatch.job_list l ON l.id = m.id) ON true
    ORDER BY l.id DESC NULLS LAST
$$;

-- The ids of the live jobs a filter matches, newest first, below a cursor: a bulk action's chunk.
CREATE FUNCTION dispatch.console_job_ids_v1(queue_is text, kind_is text, tenant_is text, state_is text,
                                            args_contain jsonb, before_id bigint, limit_rows integer)
RETURNS SETOF bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT j.id FROM dispatch.jobs j
    WHERE (before_id IS NULL OR j.id < before_id)
      AND (queue_is IS NULL OR j.queue = queue_is)
      AND (kind_is IS NULL OR j.kind = kind_is)
      AND (tenant_is IS NULL OR j.tenant = tenant_is)
      AND (state_is IS NULL OR CASE state_is
            WHEN 'running' THEN j.state = 'running'
            WHEN 'parked' THEN j.state <> 'running' AND j.parked_at IS NOT NULL
            WHEN 'scheduled' THEN j.state <> 'running' AND j.parked_at IS NULL AND j.run_at > now()
            ELSE j.state <> 'running' AND j.parked_at IS NULL AND j.run_at <= now() END)
      AND (args_contain IS NULL OR j.args @> args_contain)
    ORDER BY j.id DESC LIMIT limit_rows
$$;

-- A job by its idempotency key: the live one (an index lookup per queue), else the finished one
-- the key is kept for.
CREATE FUNCTION dispatch.console_job_by_key_v1(key_is text) RETURNS SETOF bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    (SELECT j.id FROM dispatch.queues q JOIN dispatch.jobs j ON j.queue = q.name AND j.idempotency_key = key_is
     UNION ALL
     SELECT k.job_id FROM dispatch.idempotency_keys k JOIN dispatch.queues q ON q.name = k.queue WHERE k.key = key_is)
    LIMIT 5
$$;

CREATE FUNCTION dispatch.console_job_v1(job_id bigint)
RETURNS TABLE (id bigint, queue text, kind text, args jsonb, priority smallint, state text, run_at timestamptz,
               expire_at timestamptz, attempt integer, max_attempts integer, tenant text, version bigint,
               created_at timestamptz, last_error text, leased_by text, lease_expires timestamptz,
               idempotency_key text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT l.id, l.queue, l.kind, l.args, l.priority, l.state, l.run_at, l.expire_at, l.attempt, l.max_attempts,
           l.tenant, l.version, l.created_at, l.last_error, l.leased_by, l.lease_expires_at, j.idempotency_key
    FROM dispatch.job_list l JOIN dispatch.jobs j ON j.id = l.id WHERE l.id = job_id
$$;

CREATE FUNCTION dispatch.console_dead_job_v1(dead_id bigint)
RETURNS TABLE (job_id bigint, queue text, kind text, args jsonb, tenant text, attempt integer, reason text,
               last_error text, last_status integer, created_at timestamptz, died_at timestamptz,
               idempotency_key text, expire_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT l.job_id, l.queue, l.kind, l.args, l.tenant, l.attempt, l.reason, l.last_error, l.last_status,
           l.created_at, l.died_at, d.idempotency_key, d.expire_at
    FROM dispatch.dead_job_list l JOIN dispatch.dead_jobs d ON d.job_id = l.job_id WHERE l.job_id = dead_id
$$;

-- Dead letters, newest death first, below a cursor (died_at, job_id).
CREATE FUNCTION dispatch.console_dead_v1(queue_is text, kind_is text, reason_is text, died_since timestamptz,
                                         died_until timestamptz, before_at timestamptz, before_id bigint,
                                         scan_rows integer, page_rows integer)
RETURNS TABLE (job_id bigint, queue text, kind text, reason text, attempt integer, last_status integer,
               last_error text, tenant text, died_at timestamptz, scanned bigint, lowest_at timestamptz,
               lowest_id bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH scanned AS MATERIALIZED (  -- by (died_at, job_id), or (queue, died_at) for one queue
        SELECT d.job_id, d.died_at, d.kind, d.reason FROM dispatch.dead_jobs d
        WHERE (before_at IS NULL OR (d.died_at, d.job_id) < (before_at, before_id))
          AND (queue_is IS NULL OR d.queue = queue_is)
          AND (died_since IS NULL OR d.died_at >= died_since)
          AND (died_until IS NULL OR d.died_at < died_until)
        ORDER BY d.died_at DESC, d.job_id DESC LIMIT scan_rows
    ), page AS (
        SELECT s.job_id, s.died_at FROM scanned s
        WHERE (kind_is IS NULL OR s.kind = kind_is) AND (reason_is IS NULL OR s.reason = reason_is)
        ORDER BY s.died_at DESC, s.job_id DESC LIMIT page_rows
    )
    SELECT l.job_id, l.queue, l.kind, l.reason, l.attempt, l.last_status, l.last_error, l.tenant, l.died_at,
           f.scanned, f.lowest_at, f.lowest_id
    FROM (SELECT count(*) AS scanned, min(s.died_at) AS lowest_at,
                 (array_agg(s.job_id ORDER BY s.died_at, s.job_id))[1] AS lowest_id FROM scanned s) f
    LEFT JOIN (page p JOIN dispatch.dead_job_list l ON l.job_id = p.job_id) ON true
    ORDER BY p.died_at DESC NULLS LAST, p.job_id DESC
$$;

-- The ids of the dead letters a filter matches, oldest death first, after a cursor: a bulk
-- action's chunk (a chunk revived or purged leaves the filter; the cursor only moves on).
CREATE FUNCTION dispatch.console_dead_ids_v1(queue_is text, kind_is text, reason_is text, older_than interval,
                                             died_since timestamptz, died_until timestamptz,
                                             after_at timestamptz, after_id bigint, limit_rows integer)
RETURNS TABLE (job_id bigint, died_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT d.job_id, d.died_at FROM dispatch.dead_jobs d
    WHERE (queue_is IS NULL OR d.queue = queue_is)
      AND (kind_is IS NULL OR d.kind = kind_is)
      AND (reason_is IS NULL OR d.reason = reason_is)
      AND (older_than IS NULL OR d.died_at < now() - older_than)
      AND (died_since IS NULL OR d.died_at >= died_since)
      AND (died_until IS NULL OR d.died_at < died_until)
      AND (after_at IS NULL OR (d.died_at, d.job_id) > (after_at, after_id))
    ORDER BY d.died_at, d.job_id LIMIT limit_rows
$$;

CREATE FUNCTION dispatch.console_processes_v1(type_is text, status_is text, before_id bigint, scan_rows integer,
                                              page_rows integer)
RETURNS TABLE (id bigint, type text, version integer, status text, current_step text, attempts integer, error text,
               retry_after timestamptz, created_at timestamptz, updated_at timestamptz, finished_at timestamptz,
               scanned bigint, lowest bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH scanned AS MATERIALIZED (
        SELECT p.id, p.type, p.status FROM dispatch.processes p
        WHERE before_id IS NULL OR p.id < before_id
        ORDER BY p.id DESC LIMIT scan_rows
    ), page AS (
        SELECT s.id FROM scanned s
        WHERE (type_is IS NULL OR s.type = type_is) AND (status_is IS NULL OR s.status::text = status_is)
        ORDER BY s.id DESC LIMIT page_rows
    )
    SELECT l.id, l.type, l.version, l.status::text, l.current_step, l.attempts, l.error, l.retry_after,
           l.created_at, l.updated_at, l.finished_at, f.scanned, f.lowest
    FROM (SELECT count(*) AS scanned, min(s.id) AS lowest FROM scanned s) f
    LEFT JOIN (page p JOIN dispatch.process_list l ON l.id = p.id) ON true
    ORDER BY l.id DESC NULLS LAST
$$;

-- Enterprises with their CRMs' state (an enterprise admin: their own), by number.
CREATE FUNCTION dispatch.console_enterprises_v1(after_number text, page_rows integer)
RETURNS TABLE (number text, name text, integrations jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.number, e.name,
           coalesce((SELECT jsonb_agg(jsonb_build_object('integration', s.integration, 'enabled', s.enabled,
                                                         'breaker', s.breaker) ORDER BY s.integration)
                     FROM dispatch.integration_status s WHERE s.enterprise = e.number), '[]')
    FROM dispatch.enterprises e
    WHERE (after_number IS NULL OR e.number > after_number)  -- the scope once (an InitPlan), not per row
      AND ((SELECT dispatch.console_enterprise_scope()) IS NULL
           OR e.number = ANY (coalesce((SELECT dispatch.console_enterprise_scope()), '{}')))
    ORDER BY e.number LIMIT page_rows
$$;

CREATE FUNCTION dispatch.console_enterprise_v1(number_is text)
RETURNS TABLE (number text, name text, integrations_config jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.number, e.name, dispatch.mask_integrations(e.integrations_config)
    FROM dispatch.enterprises e WHERE e.number = number_is AND dispatch.console_sees_enterprise(e.number)
$$;

-- An enterprise's recent call events with their attempts: the newest scan_rows events (by
-- index), their history joined, filtered by outcome ('ok', 'error', or NULL for both).
CREATE FUNCTION dispatch.console_crm_logs_v1(number_is text, before_at timestamptz, outcome_is text,
                                             scan_rows integer, page_rows integer)
RETURNS TABLE (call_unique_id text, event text, integration text, created_at timestamptz, attempt integer,
               outcome text, status integer, error text, request_excerpt text, response_excerpt text,
               finished_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.call_unique_id, c.event, c.integration, c.created_at, h.attempt, h.outcome, h.status,
           dispatch.mask_text(h.error), dispatch.mask_text(h.detail ->> 'request'),
           dispatch.mask_text(h.detail ->> 'response'), h.finished_at
    FROM (SELECT c.* FROM dispatch.call_events c
          WHERE c.enterprise = number_is AND (before_at IS NULL OR c.created_at < before_at)
            AND dispatch.console_sees_enterprise(number_is)
          ORDER BY c.created_at DESC LIMIT scan_rows) c
    JOIN dispatch.job_history h ON h.job_id = c.job_id
    WHERE outcome_is IS NULL OR (outcome_is = 'ok') = (h.outcome = 'completed')
    ORDER BY h.finished_at DESC LIMIT page_rows
$$;

-- A connection test's job, for the console user who asked for it (the audit log says who):
-- waiting (state), or how it ended; and how many live workers serve its queue.
CREATE FUNCTION dispatch.console_test_result_v1(test_job bigint, queue_is text, asked_by text)
RETURNS TABLE (state text, outcome text, result text, error text, target text, at timestamptz, workers bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT (SELECT j.state::text FROM dispatch.jobs j WHERE j.id = a.job),
           h.outcome, dispatch.mask_text(h.detail ->> 'result'), dispatch.mask_text(h.error), a.target, a.at,
           (SELECT count(*) FROM dispatch.worker_status w WHERE w.status = 'alive'
              AND (cardinality(w.queues) = 0 OR '*' = ANY (w.queues) OR queue_is = ANY (w.queues)))
    FROM (SELECT (x.detail ->> 'job_id')::bigint AS job, x.target, x.at FROM dispatch.audit_log x
          WHERE x.action = 'test' AND x.who = asked_by AND x.detail ->> 'job_id' = test_job::text
          ORDER BY x.id DESC LIMIT 1) a
    LEFT JOIN LATERAL (SELECT h.outcome, h.detail, h.error FROM dispatch.job_history h
                       WHERE h.job_id = a.job ORDER BY h.finished_at DESC LIMIT 1) h ON true
$$;

-- -- The console's own role: the reader's rights, its accounts, the actions it calls ---------------

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dispatch_console') THEN
        CREATE ROLE dispatch_console NOLOGIN;
    END IF;
END $$;
GRANT dispatch_reader TO dispatch_console;

REVOKE ALL ON dispatch.console_users, dispatch.console_sessions, dispatch.console_login_failures,
    dispatch.history_minutes FROM PUBLIC;
GRANT SELECT ON dispatch.job_attempts, dispatch.history_minutes TO dispatch_reader, dispatch_worker;
GRANT SELECT ON dispatch.console_user_list TO dispatch_console;
GRANT SELECT ON dispatch.console_users TO dispatch_console;
GRANT SELECT, INSERT, UPDATE, DELETE ON dispatch.console_sessions TO dispatch_console;
GRANT SELECT, INSERT, DELETE ON dispatch.console_login_failures TO dispatch_console;
GRANT SELECT, INSERT, UPDATE ON dispatch.history_minutes TO dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.mask_secrets(jsonb), dispatch.mask_text(text), dispatch.mask_url_path(text),
    dispatch.mask_settings(text, text, jsonb), dispatch.mask_integrations(jsonb) TO dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.cancel_job_by_key(text, text, text) TO dispatch_producer;
GRANT EXECUTE ON FUNCTION
    dispatch.console_user(), dispatch.console_sees_enterprise(text), dispatch.console_sees_entity(bigint),
    dispatch.console_sees_credential(bigint), dispatch.console_may_act(), dispatch.console_may_operate(),
    dispatch.console_entity_scope(), dispatch.console_enterprise_scope(),
    dispatch.console_require_operator(),
    dispatch.audit_v1(text, text, text, text, jsonb),
    dispatch.audit_jobs_v1(text, text, bigint[], text),
    dispatch.cancel_jobs_v1(bigint[], text, text),
    dispatch.run_jobs_now_v1(bigint[], text),
    dispatch.run_command_v1(text, text),
    dispatch.resend_leads_v2(bigint[], text[], text),
    dispatch.test_credential_v1(bigint, text),
    dispatch.test_integration_v1(text, text, text),
    dispatch.retry_dead_v3(bigint[], timestamptz, text, text),
    dispatch.purge_dead_v1(bigint[], text, text),
    dispatch.pause_queue_v1(text, boolean, text, text),
    dispatch.update_queue_v1(text, jsonb, text, text),
    dispatch.set_limit_v1(text, jsonb, text, text),
    dispatch.delete_limit_v1(text, text, text),
    dispatch.reset_limit_v3(text, text, text),
    dispatch.switch_command_v1(text, boolean, text, text),
    dispatch.unlock_command_v1(text, text, text),
    dispatch.restart_process_v1(bigint, text, text, text),
    dispatch.work_process_v1(bigint, text),
    dispatch.abandon_process_v1(bigint, text, text),
    dispatch.enable_credential_v1(bigint, boolean, text, text),
    dispatch.set_enterprise_integration_v1(text, text, jsonb, text, text, text),
    dispatch.reset_integration_v1(text, text, text),
    dispatch.console_require_admin(),
    dispatch.add_console_user_v1(text, text, text, text[], bigint[], text),
    dispatch.disable_console_user_v1(text, boolean, text),
    dispatch.set_console_password_v1(text, text, text),
    dispatch.delete_console_user_v1(text, text),
    dispatch.integration_sends(jsonb, text)
TO dispatch_console;
GRANT EXECUTE ON FUNCTION dispatch.console_queues_v1(integer), dispatch.console_throughput_v1(interval, interval)
TO dispatch_reader;
GRANT EXECUTE ON FUNCTION
    dispatch.console_jobs_v1(text, text, text, text, jsonb, bigint, integer, integer),
    dispatch.console_job_ids_v1(text, text, text, text, jsonb, bigint, integer),
    dispatch.console_job_by_key_v1(text),
    dispatch.console_job_v1(bigint),
    dispatch.console_dead_job_v1(bigint),
    dispatch.console_dead_v1(text, text, text, timestamptz, timestamptz, timestamptz, bigint, integer, integer),
    dispatch.console_dead_ids_v1(text, text, text, interval, timestamptz, timestamptz, timestamptz, bigint, integer),
    dispatch.console_processes_v1(text, text, bigint, integer, integer),
    dispatch.console_enterprises_v1(text, integer),
    dispatch.console_enterprise_v1(text),
    dispatch.console_crm_logs_v1(text, timestamptz, text, integer, integer),
    dispatch.console_test_result_v1(bigint, text, text)
TO dispatch_console;
