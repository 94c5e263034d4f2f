-- 0009: processes (seed 001): types, instances, the journal, operators. Kept in step with sql/schema.sql.

-- ---------------------------------------------------------------------------------------------
-- Processes (seed 001): multi-step work whose steps are named, journaled and resumed by name.
-- Types are registered by workers from their App; instances are started from any SQL client.
-- Each step attempt is a job of kind process:<type> tied to (step, attempt): a job that no
-- longer matches its instance (run by `work`, restarted, abandoned) does nothing.
-- ---------------------------------------------------------------------------------------------
CREATE TYPE dispatch.process_status AS ENUM ('pending', 'running', 'retry', 'error', 'done', 'abandoned');

CREATE TABLE dispatch.process_types (
    type          text PRIMARY KEY
        CONSTRAINT process_type_format CHECK (type ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$'),
    name          text NOT NULL,
    version       integer NOT NULL CONSTRAINT process_type_version_positive CHECK (version >= 1),
    steps         text[] NOT NULL CONSTRAINT process_type_has_steps CHECK (cardinality(steps) >= 1),
    queue         text NOT NULL DEFAULT 'default',
    registered_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dispatch.processes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type            text NOT NULL REFERENCES dispatch.process_types (type),
    version         integer NOT NULL,
    status          dispatch.process_status NOT NULL DEFAULT 'pending',
    current_step    text,
    state           jsonb NOT NULL DEFAULT '{}'
        CONSTRAINT process_state_must_be_a_json_object CHECK (jsonb_typeof(state) = 'object'),
    attempts        integer NOT NULL DEFAULT 0,
    run_seq         integer NOT NULL DEFAULT 0,  -- which job may run it: the last one enqueued
    retry_after     timestamptz,
    error           text,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT process_key_unique_per_type UNIQUE (type, idempotency_key)
);
CREATE INDEX processes_status ON dispatch.processes (status, type) WHERE status NOT IN ('done', 'abandoned');

-- The journal: one row per step attempt, read by index for one instance.
CREATE TABLE dispatch.process_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    process_id  bigint NOT NULL REFERENCES dispatch.processes (id) ON DELETE CASCADE,
    step        text NOT NULL,
    attempt     integer NOT NULL,
    status      text NOT NULL CONSTRAINT process_history_status CHECK (status IN ('done', 'retry', 'error', 'operator')),
    message     text,
    payload     jsonb,
    error       text,
    version     integer NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX process_history_process ON dispatch.process_history (process_id, id);

-- A worker's App, at start: a type's definition is the newest version's.
CREATE FUNCTION dispatch.register_process_type_v1(process_type text, name text, version integer, steps text[],
                                                  queue text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO dispatch.process_types AS t (type, name, version, steps, queue)
    VALUES (process_type, name, version, steps, coalesce(queue, 'default'))
    ON CONFLICT (type) DO UPDATE
        SET name = excluded.name, version = excluded.version, steps = excluded.steps, queue = excluded.queue,
            registered_at = now()
        WHERE t.version <= excluded.version;
$$;

-- The job that runs the instance's current step (at `run_at`). Each gets the next run_seq: an
-- older job still queued for the instance (a retry overtaken by `work`) then does nothing.
CREATE FUNCTION dispatch.enqueue_process_step(process_id bigint, run_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH p AS (
        UPDATE dispatch.processes x SET run_seq = x.run_seq + 1 WHERE x.id = process_id RETURNING x.*
    )
    INSERT INTO dispatch.jobs (queue, kind, args, run_at, max_attempts)
    SELECT t.queue, 'process:' || p.type, jsonb_build_object('process_id', p.id, 'run_seq', p.run_seq),
           greatest(run_at, now()), 1000
    FROM p JOIN dispatch.process_types t ON t.type = p.type
    RETURNING id;
$$;

CREATE FUNCTION dispatch.start_process(type text, state jsonb DEFAULT '{}', idempotency_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    t dispatch.process_types;
    p dispatch.processes;
BEGIN
    SELECT * INTO t FROM dispatch.process_types pt WHERE pt.type = start_process.type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dispatch.start_process: unknown process type %; registered: %', type,
            coalesce((SELECT string_agg(pt.type, ', ' ORDER BY pt.type) FROM dispatch.process_types pt), 'none')
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF state IS NULL OR jsonb_typeof(state) <> 'object' THEN
        RAISE EXCEPTION 'dispatch.start_process: state must be a JSON object, got %',
            coalesce(jsonb_typeof(state), 'null') USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO dispatch.processes AS x (type, version, current_step, state, idempotency_key)
    VALUES (t.type, t.version, t.steps[1], state, idempotency_key)
    ON CONFLICT ON CONSTRAINT process_key_unique_per_type DO NOTHING
    RETURNING * INTO p;
    IF p.id IS NULL THEN
        RETURN (SELECT x.id FROM dispatch.processes x
                WHERE x.type = t.type AND x.idempotency_key = start_process.idempotency_key);
    END IF;
    PERFORM dispatch.enqueue_process_step(p.id);
    RETURN p.id;
END $$;

-- Operators (every action audited): restart from error or retry (at a step by name), work now,
-- abandon for good.
CREATE FUNCTION dispatch.restart_process_v1(process_id bigint, from_step text, who text, reason text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p dispatch.processes;
    steps text[];
BEGIN
    SELECT * INTO p FROM dispatch.processes WHERE id = process_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no process %', process_id USING ERRCODE = 'no_data_found';
    END IF;
    IF p.status NOT IN ('error', 'retry') THEN
        RAISE EXCEPTION 'process % is %: only a process in error or retry can be restarted', process_id, p.status
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT t.steps INTO steps FROM dispatch.process_types t WHERE t.type = p.type;
    IF from_step IS NOT NULL AND NOT from_step = ANY (steps) THEN
        RAISE EXCEPTION 'process %: no step % in %; its steps: %', process_id, from_step, p.type,
            array_to_string(steps, ', ') USING ERRCODE = 'check_violation';
    END IF;
    UPDATE dispatch.processes
    SET status = 'pending', current_step = coalesce(from_step, current_step), attempts = 0, error = NULL,
        retry_after = NULL, updated_at = now()
    WHERE id = process_id RETURNING * INTO p;
    INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, version)
    VALUES (process_id, p.current_step, 0, 'operator', format('restarted by %s: %s', who, coalesce(reason, '-')),
            p.version);
    INSERT INTO dispatch.audit_log (who, action, target, reason)
    VALUES (who, 'restart', 'process:' || process_id, reason);
    PERFORM dispatch.enqueue_process_step(process_id);
END $$;

CREATE FUNCTION dispatch.work_process_v1(process_id bigint, who text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p dispatch.processes;
BEGIN
    SELECT * INTO p FROM dispatch.processes WHERE id = process_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no process %', process_id USING ERRCODE = 'no_data_found';
    END IF;
    IF p.status IN ('done', 'abandoned', 'running') THEN
        RAISE EXCEPTION 'process % is %: nothing to work now', process_id, p.status USING ERRCODE = 'check_violation';
    END IF;
    -- The job already waiting for this step (a retry's) becomes a no-op: see run_seq.
    UPDATE dispatch.processes SET status = 'pending', retry_after = NULL, error = NULL,
                                  attempts = CASE WHEN status = 'error' THEN 0 ELSE attempts END,
                                  updated_at = now()
    WHERE id = process_id RETURNING * INTO p;
    INSERT INTO dispatch.audit_log (who, action, target) VALUES (who, 'work', 'process:' || process_id);
    PERFORM dispatch.enqueue_process_step(process_id);
END $$;

CREATE FUNCTION dispatch.abandon_process_v1(process_id bigint, who text, reason text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p dispatch.processes;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'abandoning process % needs a reason', process_id USING ERRCODE = 'check_violation';
    END IF;
    UPDATE dispatch.processes SET status = 'abandoned', finished_at = now(), updated_at = now(),
                                  error = format('abandoned by %s: %s', who, reason)
    WHERE id = process_id AND status NOT IN ('done', 'abandoned') RETURNING * INTO p;
    IF p.id IS NULL THEN
        IF NOT EXISTS (SELECT 1 FROM dispatch.processes WHERE id = process_id) THEN
            RAISE EXCEPTION 'no process %', process_id USING ERRCODE = 'no_data_found';
        END IF;
        RAISE EXCEPTION 'process % is already finished', process_id USING ERRCODE = 'check_violation';
    END IF;
    INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, version)
    VALUES (process_id, coalesce(p.current_step, '-'), p.attempts, 'operator', p.error, p.version);
    INSERT INTO dispatch.audit_log (who, action, target, reason)
    VALUES (who, 'abandon', 'process:' || process_id, reason);
END $$;

GRANT SELECT, INSERT, UPDATE ON dispatch.process_types, dispatch.processes TO dispatch_worker;
GRANT SELECT, INSERT ON dispatch.process_history TO dispatch_worker;
GRANT SELECT ON dispatch.process_types, dispatch.processes TO dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.start_process(text, jsonb, text) TO dispatch_producer, dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.register_process_type_v1(text, text, integer, text[], text),
    dispatch.enqueue_process_step(bigint, timestamptz),
    dispatch.restart_process_v1(bigint, text, text, text), dispatch.work_process_v1(bigint, text),
    dispatch.abandon_process_v1(bigint, text, text) TO dispatch_worker;

-- The quiet window: no step starts in it (fiscal and accounting data must not collide at the
-- day's close); steps are deferred to its end, running ones finish. Default: the last 10
-- minutes of the day, UTC. Data: UPDATE dispatch.process_settings SET ...
CREATE TABLE dispatch.process_settings (
    one         boolean PRIMARY KEY DEFAULT true CONSTRAINT process_settings_single_row CHECK (one),
    quiet_start time NOT NULL DEFAULT '23:50',
    quiet_end   time NOT NULL DEFAULT '00:00',  -- 00:00: midnight, the end of the day
    time_zone   text NOT NULL DEFAULT 'UTC'
);
INSERT INTO dispatch.process_settings DEFAULT VALUES;

CREATE FUNCTION dispatch.check_process_time_zone() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.time_zone) THEN
        RAISE EXCEPTION 'process_settings.time_zone: % is not a time zone name (e.g. Europe/Warsaw)',
            NEW.time_zone USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER process_settings_time_zone BEFORE INSERT OR UPDATE ON dispatch.process_settings
    FOR EACH ROW EXECUTE FUNCTION dispatch.check_process_time_zone();

-- When the quiet window that `at` falls in ends; NULL outside it.
CREATE FUNCTION dispatch.process_quiet_until(at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN (s.quiet_start < s.quiet_end AND l.t >= s.quiet_start AND l.t < s.quiet_end)
          OR (s.quiet_start >= s.quiet_end AND (l.t >= s.quiet_start OR l.t < s.quiet_end))
        THEN ((l.local::date + CASE WHEN l.t < s.quiet_end THEN 0 ELSE 1 END) + s.quiet_end)
             AT TIME ZONE s.time_zone
        END
    FROM dispatch.process_settings s,
         LATERAL (SELECT at AT TIME ZONE s.time_zone AS local) z,
         LATERAL (SELECT z.local AS local, z.local::time AS t) l
$$;

GRANT SELECT ON dispatch.process_settings TO dispatch_worker, dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.process_quiet_until(timestamptz) TO dispatch_worker;

-- A step attempt in two calls. Take: the instance must still wait for this job (run_seq), not
-- be newer than the worker's type, not be in the quiet window, and stand at a step the worker
-- knows; then it is `running` with one more attempt.
CREATE FUNCTION dispatch.take_process_step_v1(process_id bigint, run_seq integer, worker_version integer,
                                              steps text[], at timestamptz)
RETURNS TABLE (outcome text, step text, attempt integer, state jsonb, detail text, wait_seconds double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    p dispatch.processes;
    quiet timestamptz;
    message text;
BEGIN
    SELECT * INTO p FROM dispatch.processes x WHERE x.id = take_process_step_v1.process_id FOR UPDATE;
    IF NOT FOUND OR p.run_seq <> take_process_step_v1.run_seq
       OR p.status NOT IN ('pending', 'retry', 'running') THEN
        RETURN QUERY SELECT 'skip', NULL::text, NULL::integer, NULL::jsonb, NULL::text, NULL::double precision;
        RETURN;
    END IF;
    IF p.version > worker_version THEN
        RETURN QUERY SELECT 'newer', p.current_step, p.attempts, NULL::jsonb,
            format('process %s started on %s version %s; this worker runs version %s', p.id, p.type,
                   p.version, worker_version), 60::double precision;
        RETURN;
    END IF;
    quiet := dispatch.process_quiet_until(at);
    IF quiet IS NOT NULL THEN
        RETURN QUERY SELECT 'quiet', p.current_step, p.attempts, NULL::jsonb,
            format('quiet window: no step starts until %s', to_char(quiet AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"')),
            greatest(1, extract(epoch FROM quiet - at))::double precision;
        RETURN;
    END IF;
    IF NOT p.current_step = ANY (steps) THEN
        message := format('step %L of process %s (started on version %s) does not exist in %s version %s; '
                          'its steps: %s. Restart it from a step: pgdispatch process restart %s --from-step NAME',
                          p.current_step, p.id, p.version, p.type, worker_version,
                          array_to_string(steps, ', '), p.id);
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, error, version)
        VALUES (p.id, p.current_step, p.attempts, 'error', message, worker_version);
        UPDATE dispatch.processes x SET status = 'error', error = message, updated_at = now() WHERE x.id = p.id;
        RETURN QUERY SELECT 'missing', p.current_step, p.attempts, NULL::jsonb, message, NULL::double precision;
        RETURN;
    END IF;
    UPDATE dispatch.processes x SET status = 'running', attempts = x.attempts + 1, retry_after = NULL,
                                    updated_at = now()
    WHERE x.id = p.id;
    RETURN QUERY SELECT 'take', p.current_step, p.attempts + 1, p.state, NULL::text, NULL::double precision;
END $$;

-- Finish: the journal row, the state and the next step in one transaction. result: done (to
-- next_step, or the end), retry (after `delay` seconds: a job then), error. With continue_here
-- the caller goes on to the next step itself (no job for it); returns the instance's status,
-- or 'skip' when it moved on meanwhile (restarted, worked, abandoned).
CREATE FUNCTION dispatch.finish_process_step_v1(
    process_id bigint, run_seq integer, step text, attempt integer, worker_version integer,
    started_at timestamptz, result text, message text, payload jsonb, state jsonb, next_step text,
    delay double precision, error text, continue_here boolean
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    p dispatch.processes;
    new_status dispatch.process_status;
BEGIN
    SELECT * INTO p FROM dispatch.processes x WHERE x.id = process_id FOR UPDATE;
    IF NOT FOUND OR p.run_seq <> run_seq OR p.status <> 'running' THEN
        RETURN 'skip';
    END IF;
    INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, payload, error, version,
                                          started_at)
    VALUES (process_id, step, attempt, result, message, dispatch.mask_secrets(payload), dispatch.mask_text(error),
            worker_version, started_at);
    new_status := CASE WHEN result = 'retry' THEN 'retry'
                   WHEN result = 'error' THEN 'error'
                   WHEN next_step IS NULL THEN 'done'
                   ELSE 'pending' END;
    UPDATE dispatch.processes x
    SET status = new_status,
        state = CASE WHEN result = 'done' THEN x.state || coalesce(finish_process_step_v1.state, '{}') ELSE x.state END,
        current_step = CASE WHEN result = 'done' THEN next_step ELSE x.current_step END,
        attempts = CASE WHEN result = 'done' THEN 0 ELSE x.attempts END,
        error = CASE WHEN result = 'done' THEN NULL ELSE dispatch.mask_text(finish_process_step_v1.error) END,
        retry_after = CASE WHEN result = 'retry' THEN now() + make_interval(secs => delay) END,
        finished_at = CASE WHEN new_status = 'done' THEN now() END,
        updated_at = now()
    WHERE x.id = process_id;
    IF new_status = 'retry' OR (new_status = 'pending' AND NOT continue_here) THEN
        PERFORM dispatch.enqueue_process_step(process_id, now() + make_interval(secs => coalesce(delay, 0)));
    END IF;
    RETURN new_status::text;
END $$;

GRANT EXECUTE ON FUNCTION
    dispatch.take_process_step_v1(bigint, integer, integer, text[], timestamptz),
    dispatch.finish_process_step_v1(bigint, integer, text, integer, integer, timestamptz, text, text, jsonb,
                                    jsonb, text, double precision, text, boolean) TO dispatch_worker;
