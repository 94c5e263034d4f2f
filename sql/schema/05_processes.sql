-- Processes: types, instances, their journal, taking and finishing steps, versions, the quiet window.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

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

-- ---------------------------------------------------------------------------------------------
-- Process steps in batches: a worker takes (and finishes) the steps of many instances in one
-- call, set-based, in process id order (two batches never deadlock). Finishing a step with
-- continue_here takes the next one in the same statement: one round trip and one row update
-- per step. The _v1 functions stay for workers of the previous release.
-- ---------------------------------------------------------------------------------------------
CREATE FUNCTION dispatch.take_process_steps_v2(process_ids bigint[], run_seqs integer[], worker_version integer,
                                               steps text[], at timestamptz)
RETURNS TABLE (process_id bigint, run_seq integer, outcome text, step text, attempt integer, state jsonb,
               detail text, wait_seconds double precision)  -- a row per instance taken or held; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
BEGIN
    -- No joins between the CTEs below: their row counts are unknown to the planner, and a
    -- nested loop over two of them costs the square of the batch.
    RETURN QUERY
    WITH wanted AS (
        SELECT DISTINCT r.id, r.run_seq FROM unnest(process_ids, run_seqs) AS r (id, run_seq)
    ), locked AS (
        SELECT p.id, p.run_seq, p.type, p.version, p.current_step, p.attempts,
               CASE WHEN p.version > worker_version THEN 'newer'
                    WHEN quiet IS NOT NULL THEN 'quiet'
                    WHEN NOT p.current_step = ANY (steps) THEN 'missing'
                    ELSE 'take' END AS outcome
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        WHERE p.status IN ('pending', 'retry', 'running')
        ORDER BY p.id
        FOR UPDATE OF p
    ), missing AS (
        SELECT l.id, l.run_seq, l.current_step, l.attempts,
               format('step %L of process %s (started on version %s) does not exist in %s version %s; '
                      'its steps: %s. Restart it from a step: pgdispatch process restart %s --from-step NAME',
                      l.current_step, l.id, l.version, l.type, worker_version,
                      array_to_string(steps, ', '), l.id) AS message
        FROM locked l WHERE l.outcome = 'missing'
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, error, version)
        SELECT m.id, m.current_step, m.attempts, 'error', m.message, worker_version FROM missing m
    ), stopped AS (
        UPDATE dispatch.processes x SET status = 'error', error = m.message, updated_at = now()
        FROM missing m WHERE x.id = m.id
    ), taken AS (
        UPDATE dispatch.processes x SET status = 'running', attempts = x.attempts + 1, retry_after = NULL,
                                        updated_at = now()
        FROM locked l WHERE x.id = l.id AND l.outcome = 'take'
        RETURNING x.id, x.run_seq, x.current_step, x.attempts, x.state
    )
    SELECT t.id, t.run_seq, 'take', t.current_step, t.attempts, t.state, NULL::text, NULL::double precision
    FROM taken t
    UNION ALL
    SELECT m.id, m.run_seq, 'missing', m.current_step, m.attempts, NULL::jsonb, m.message, NULL::double precision
    FROM missing m
    UNION ALL
    SELECT l.id, l.run_seq, l.outcome, l.current_step, l.attempts, NULL::jsonb,
           CASE l.outcome
               WHEN 'newer' THEN format('process %s started on %s version %s; this worker runs version %s',
                                        l.id, l.type, l.version, worker_version)
               ELSE format('quiet window: no step starts until %s',
                           to_char(quiet AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))
           END,
           CASE l.outcome
               WHEN 'newer' THEN 60::double precision
               ELSE greatest(1, extract(epoch FROM quiet - at))::double precision
           END
    FROM locked l WHERE l.outcome IN ('newer', 'quiet');
END $$;

-- Finish a batch of step attempts: the journal rows, the states and what comes next, in one
-- statement. result: done (to next_step, or the end), retry (after `delay` seconds), error.
-- A done step with continue_here outside the quiet window takes the next step at once
-- (status 'running', returned with its attempt and state); otherwise a pending or retrying
-- instance gets a job of its own (at the quiet window's end, when in it). 'skip': the instance
-- moved on meanwhile (restarted, worked, abandoned) and nothing was written.
CREATE FUNCTION dispatch.finish_process_steps_v2(
    process_ids bigint[], run_seqs integer[], steps text[], attempts integer[], worker_version integer,
    started_ats timestamptz[], results text[], messages text[], payloads jsonb[], states jsonb[],
    next_steps text[], delays double precision[], errors text[], continue_here boolean[], at timestamptz
) RETURNS TABLE (process_id bigint, run_seq integer, status text, step text, attempt integer, state jsonb)
    -- a row per instance finished; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
BEGIN
    IF EXISTS (SELECT FROM unnest(results) r WHERE r IS NULL OR r NOT IN ('done', 'retry', 'error')) THEN
        RAISE EXCEPTION 'dispatch.finish_process_steps_v2: result must be done, retry or error'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN QUERY
    WITH wanted AS (  -- of duplicate requests, one counts
        SELECT DISTINCT ON (r.id, r.run_seq) r.*
        FROM unnest(process_ids, run_seqs, steps, attempts, started_ats, results, messages, payloads, states,
                    next_steps, delays, errors, continue_here)
            AS r (id, run_seq, step, attempt, started_at, result, message, payload, state, next_step, delay,
                  error, continue_here)
    ), decided AS (
        SELECT w.*,
               CASE WHEN w.result = 'retry' THEN 'retry'
                    WHEN w.result = 'error' THEN 'error'
                    WHEN w.next_step IS NULL THEN 'done'
                    WHEN w.continue_here AND quiet IS NULL THEN 'running'
                    ELSE 'pending' END::dispatch.process_status AS new_status
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        WHERE p.status = 'running'
        ORDER BY p.id
        FOR UPDATE OF p
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, payload, error, version,
                                              started_at)
        SELECT d.id, d.step, d.attempt, d.result, d.message,
               CASE WHEN d.payload IS NOT NULL THEN dispatch.mask_secrets(d.payload) END,
               CASE WHEN d.error IS NOT NULL THEN dispatch.mask_text(d.error) END, worker_version, d.started_at
        FROM decided d
    ), moved AS (
        UPDATE dispatch.processes x
        SET status = d.new_status,
            state = CASE WHEN d.result = 'done' THEN x.state || coalesce(d.state, '{}') ELSE x.state END,
            current_step = CASE WHEN d.result = 'done' THEN d.next_step ELSE x.current_step END,
            attempts = CASE WHEN d.new_status = 'running' THEN 1 WHEN d.result = 'done' THEN 0 ELSE x.attempts END,
            error = CASE WHEN d.result <> 'done' THEN dispatch.mask_text(d.error) END,
            retry_after = CASE WHEN d.result = 'retry' THEN now() + make_interval(secs => d.delay) END,
            run_seq = CASE WHEN d.new_status IN ('retry', 'pending') THEN x.run_seq + 1 ELSE x.run_seq END,
            finished_at = CASE WHEN d.new_status = 'done' THEN now() END,
            updated_at = now()
        FROM decided d WHERE x.id = d.id
        RETURNING x.id, d.run_seq AS asked_seq, x.type, x.status, x.current_step, x.attempts, x.state, x.run_seq,
                  x.retry_after
    ), enqueued AS (
        INSERT INTO dispatch.jobs (queue, kind, args, run_at, max_attempts)
        SELECT t.queue, 'process:' || m.type, jsonb_build_object('process_id', m.id, 'run_seq', m.run_seq),
               greatest(coalesce(m.retry_after, quiet, now()), now()), 1000
        FROM moved m JOIN dispatch.process_types t ON t.type = m.type
        WHERE m.status IN ('retry', 'pending')
    )
    SELECT m.id, m.asked_seq, m.status::text, m.current_step, m.attempts,
           CASE WHEN m.status = 'running' THEN m.state END
    FROM moved m;
END $$;

GRANT EXECUTE ON FUNCTION
    dispatch.take_process_steps_v2(bigint[], integer[], integer, text[], timestamptz),
    dispatch.finish_process_steps_v2(bigint[], integer[], text[], integer[], integer, timestamptz[], text[],
                                     text[], jsonb[], jsonb[], text[], double precision[], text[], boolean[],
                                     timestamptz) TO dispatch_worker;

-- Processes under review (the second review): a finish counts only for the step and attempt it
-- was taken for, by the holder of its job's lease; step jobs carry the version that wrote them, so
-- an older worker leaves them for a newer one; moving the quiet window moves what waits on it.
-- The _v2 (and _v1) functions stay for workers of the previous releases, with the same guards.

-- The version of the code that moved the instance to the step it stands on (0: its start's).
ALTER TABLE dispatch.processes ADD COLUMN written_version integer NOT NULL DEFAULT 0;

-- 'late': a finish that arrived after the instance had moved on; kept, never applied.
ALTER TABLE dispatch.process_history DROP CONSTRAINT process_history_status;
ALTER TABLE dispatch.process_history ADD CONSTRAINT process_history_status
    CHECK (status IN ('done', 'retry', 'error', 'operator', 'late'));

-- Why a worker leaves an instance alone: the version it started on, or the version that moved it
-- to its step, is newer than the worker's.
CREATE FUNCTION dispatch.process_newer_message(p dispatch.processes, worker_version integer) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN p.version > worker_version
                THEN format('process %s started on %s version %s; this worker runs version %s', p.id, p.type,
                            p.version, worker_version)
                ELSE format('process %s stands at step %s, where %s version %s moved it; this worker runs '
                            'version %s and leaves it to a newer one', p.id, p.current_step, p.type,
                            p.written_version, worker_version)
           END
$$;

CREATE OR REPLACE FUNCTION dispatch.enqueue_process_step(process_id bigint, run_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH p AS (
        UPDATE dispatch.processes x SET run_seq = x.run_seq + 1 WHERE x.id = process_id RETURNING x.*
    )
    INSERT INTO dispatch.jobs (queue, kind, args, run_at, max_attempts)
    SELECT t.queue, 'process:' || p.type,
           jsonb_build_object('process_id', p.id, 'run_seq', p.run_seq,
                              'version', greatest(p.version, p.written_version)),
           greatest(run_at, now()), 1000
    FROM p JOIN dispatch.process_types t ON t.type = p.type
    RETURNING id;
$$;

CREATE OR REPLACE FUNCTION dispatch.restart_process_v1(process_id bigint, from_step text, who text, reason text)
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
        retry_after = NULL, updated_at = now(),
        -- A step named by the operator is a step of the newest registered version.
        written_version = CASE WHEN from_step IS NULL THEN written_version
                               ELSE (SELECT t.version FROM dispatch.process_types t WHERE t.type = p.type) END
    WHERE id = process_id RETURNING * INTO p;
    INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, version)
    VALUES (process_id, p.current_step, 0, 'operator', format('restarted by %s: %s', who, coalesce(reason, '-')),
            p.version);
    INSERT INTO dispatch.audit_log (who, action, target, reason)
    VALUES (who, 'restart', 'process:' || process_id, reason);
    PERFORM dispatch.enqueue_process_step(process_id);
END $$;

CREATE OR REPLACE FUNCTION dispatch.take_process_step_v1(process_id bigint, run_seq integer, worker_version integer,
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
    IF greatest(p.version, p.written_version) > worker_version THEN
        RETURN QUERY SELECT 'newer', p.current_step, p.attempts, NULL::jsonb,
            dispatch.process_newer_message(p, worker_version), 60::double precision;
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

CREATE OR REPLACE FUNCTION dispatch.finish_process_step_v1(
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
    IF NOT FOUND OR p.run_seq <> run_seq OR p.status <> 'running' OR p.current_step <> step
       OR p.attempts <> attempt THEN
        RETURN 'skip';  -- a late finish: the instance moved on (another worker took the step)
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
        written_version = CASE WHEN result = 'done' THEN worker_version ELSE x.written_version END,
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

CREATE OR REPLACE FUNCTION dispatch.take_process_steps_v2(process_ids bigint[], run_seqs integer[], worker_version integer,
                                               steps text[], at timestamptz)
RETURNS TABLE (process_id bigint, run_seq integer, outcome text, step text, attempt integer, state jsonb,
               detail text, wait_seconds double precision)  -- a row per instance taken or held; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
BEGIN
    -- No joins between the CTEs below: their row counts are unknown to the planner, and a
    -- nested loop over two of them costs the square of the batch.
    RETURN QUERY
    WITH wanted AS (
        SELECT DISTINCT r.id, r.run_seq FROM unnest(process_ids, run_seqs) AS r (id, run_seq)
    ), locked AS (
        SELECT p.id, p.run_seq, p.type, p.version, p.current_step, p.attempts,
               dispatch.process_newer_message(p, worker_version) AS newer,
               CASE WHEN greatest(p.version, p.written_version) > worker_version THEN 'newer'
                    WHEN quiet IS NOT NULL THEN 'quiet'
                    WHEN NOT p.current_step = ANY (steps) THEN 'missing'
                    ELSE 'take' END AS outcome
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        WHERE p.status IN ('pending', 'retry', 'running')
        ORDER BY p.id
        FOR UPDATE OF p
    ), missing AS (
        SELECT l.id, l.run_seq, l.current_step, l.attempts,
               format('step %L of process %s (started on version %s) does not exist in %s version %s; '
                      'its steps: %s. Restart it from a step: pgdispatch process restart %s --from-step NAME',
                      l.current_step, l.id, l.version, l.type, worker_version,
                      array_to_string(steps, ', '), l.id) AS message
        FROM locked l WHERE l.outcome = 'missing'
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, error, version)
        SELECT m.id, m.current_step, m.attempts, 'error', m.message, worker_version FROM missing m
    ), stopped AS (
        UPDATE dispatch.processes x SET status = 'error', error = m.message, updated_at = now()
        FROM missing m WHERE x.id = m.id
    ), taken AS (
        UPDATE dispatch.processes x SET status = 'running', attempts = x.attempts + 1, retry_after = NULL,
                                        updated_at = now()
        FROM locked l WHERE x.id = l.id AND l.outcome = 'take'
        RETURNING x.id, x.run_seq, x.current_step, x.attempts, x.state
    )
    SELECT t.id, t.run_seq, 'take', t.current_step, t.attempts, t.state, NULL::text, NULL::double precision
    FROM taken t
    UNION ALL
    SELECT m.id, m.run_seq, 'missing', m.current_step, m.attempts, NULL::jsonb, m.message, NULL::double precision
    FROM missing m
    UNION ALL
    SELECT l.id, l.run_seq, l.outcome, l.current_step, l.attempts, NULL::jsonb,
           CASE l.outcome
               WHEN 'newer' THEN l.newer
               ELSE format('quiet window: no step starts until %s',
                           to_char(quiet AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))
           END,
           CASE l.outcome
               WHEN 'newer' THEN 60::double precision
               ELSE greatest(1, extract(epoch FROM quiet - at))::double precision
           END
    FROM locked l WHERE l.outcome IN ('newer', 'quiet');
END $$;

CREATE OR REPLACE FUNCTION dispatch.finish_process_steps_v2(
    process_ids bigint[], run_seqs integer[], steps text[], attempts integer[], worker_version integer,
    started_ats timestamptz[], results text[], messages text[], payloads jsonb[], states jsonb[],
    next_steps text[], delays double precision[], errors text[], continue_here boolean[], at timestamptz
) RETURNS TABLE (process_id bigint, run_seq integer, status text, step text, attempt integer, state jsonb)
    -- a row per instance finished; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
BEGIN
    IF EXISTS (SELECT FROM unnest(results) r WHERE r IS NULL OR r NOT IN ('done', 'retry', 'error')) THEN
        RAISE EXCEPTION 'dispatch.finish_process_steps_v2: result must be done, retry or error'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN QUERY
    WITH wanted AS (  -- of duplicate requests, one counts
        SELECT DISTINCT ON (r.id, r.run_seq) r.*
        FROM unnest(process_ids, run_seqs, steps, attempts, started_ats, results, messages, payloads, states,
                    next_steps, delays, errors, continue_here)
            AS r (id, run_seq, step, attempt, started_at, result, message, payload, state, next_step, delay,
                  error, continue_here)
    ), decided AS (
        SELECT w.*,
               CASE WHEN w.result = 'retry' THEN 'retry'
                    WHEN w.result = 'error' THEN 'error'
                    WHEN w.next_step IS NULL THEN 'done'
                    WHEN w.continue_here AND quiet IS NULL THEN 'running'
                    ELSE 'pending' END::dispatch.process_status AS new_status
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        -- Only for the step and attempt it was taken for: a late finish (its worker lost the
        -- lease, another took the step and went on in the same job) changes nothing.
        WHERE p.status = 'running' AND p.current_step = w.step AND p.attempts = w.attempt
        ORDER BY p.id
        FOR UPDATE OF p
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, payload, error, version,
                                              started_at)
        SELECT d.id, d.step, d.attempt, d.result, d.message,
               CASE WHEN d.payload IS NOT NULL THEN dispatch.mask_secrets(d.payload) END,
               CASE WHEN d.error IS NOT NULL THEN dispatch.mask_text(d.error) END, worker_version, d.started_at
        FROM decided d
    ), moved AS (
        UPDATE dispatch.processes x
        SET status = d.new_status,
            state = CASE WHEN d.result = 'done' THEN x.state || coalesce(d.state, '{}') ELSE x.state END,
            current_step = CASE WHEN d.result = 'done' THEN d.next_step ELSE x.current_step END,
            written_version = CASE WHEN d.result = 'done' THEN worker_version ELSE x.written_version END,
            attempts = CASE WHEN d.new_status = 'running' THEN 1 WHEN d.result = 'done' THEN 0 ELSE x.attempts END,
            error = CASE WHEN d.result <> 'done' THEN dispatch.mask_text(d.error) END,
            retry_after = CASE WHEN d.result = 'retry' THEN now() + make_interval(secs => d.delay) END,
            run_seq = CASE WHEN d.new_status IN ('retry', 'pending') THEN x.run_seq + 1 ELSE x.run_seq END,
            finished_at = CASE WHEN d.new_status = 'done' THEN now() END,
            updated_at = now()
        FROM decided d WHERE x.id = d.id
        RETURNING x.id, d.run_seq AS asked_seq, x.type, x.status, x.current_step, x.attempts, x.state, x.run_seq,
                  x.retry_after, x.written_version
    ), enqueued AS (
        INSERT INTO dispatch.jobs (queue, kind, args, run_at, max_attempts)
        SELECT t.queue, 'process:' || m.type,
               jsonb_build_object('process_id', m.id, 'run_seq', m.run_seq, 'version', m.written_version),
               greatest(coalesce(m.retry_after, quiet, now()), now()), 1000
        FROM moved m JOIN dispatch.process_types t ON t.type = m.type
        WHERE m.status IN ('retry', 'pending')
    )
    SELECT m.id, m.asked_seq, m.status::text, m.current_step, m.attempts,
           CASE WHEN m.status = 'running' THEN m.state END
    FROM moved m;
END $$;

-- v3: as v2, with the step job's id and lease token: only its current holder takes a step.
CREATE FUNCTION dispatch.take_process_steps_v3(process_ids bigint[], run_seqs integer[], job_ids bigint[],
                                               tokens uuid[], worker_version integer, steps text[], at timestamptz)
RETURNS TABLE (process_id bigint, run_seq integer, outcome text, step text, attempt integer, state jsonb,
               detail text, wait_seconds double precision)  -- a row per instance taken or held; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
BEGIN
    -- No joins between the CTEs below: their row counts are unknown to the planner, and a
    -- nested loop over two of them costs the square of the batch.
    RETURN QUERY
    WITH wanted AS (
        SELECT DISTINCT ON (r.id, r.run_seq) r.id, r.run_seq
        FROM unnest(process_ids, run_seqs, job_ids, tokens) AS r (id, run_seq, job_id, token)
        -- Only the current holder of the step job's lease takes its step: a worker that lost the
        -- lease (a pause, a partition) and asks late takes nothing.
        WHERE EXISTS (SELECT FROM dispatch.jobs j WHERE j.id = r.job_id AND j.lease_token = r.token
                                                    AND j.state = 'running')
    ), locked AS (
        SELECT p.id, p.run_seq, p.type, p.version, p.current_step, p.attempts,
               dispatch.process_newer_message(p, worker_version) AS newer,
               CASE WHEN greatest(p.version, p.written_version) > worker_version THEN 'newer'
                    WHEN quiet IS NOT NULL THEN 'quiet'
                    WHEN NOT p.current_step = ANY (steps) THEN 'missing'
                    ELSE 'take' END AS outcome
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        WHERE p.status IN ('pending', 'retry', 'running')
        ORDER BY p.id
        FOR UPDATE OF p
    ), missing AS (
        SELECT l.id, l.run_seq, l.current_step, l.attempts,
               format('step %L of process %s (started on version %s) does not exist in %s version %s; '
                      'its steps: %s. Restart it from a step: pgdispatch process restart %s --from-step NAME',
                      l.current_step, l.id, l.version, l.type, worker_version,
                      array_to_string(steps, ', '), l.id) AS message
        FROM locked l WHERE l.outcome = 'missing'
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, error, version)
        SELECT m.id, m.current_step, m.attempts, 'error', m.message, worker_version FROM missing m
    ), stopped AS (
        UPDATE dispatch.processes x SET status = 'error', error = m.message, updated_at = now()
        FROM missing m WHERE x.id = m.id
    ), taken AS (
        UPDATE dispatch.processes x SET status = 'running', attempts = x.attempts + 1, retry_after = NULL,
                                        updated_at = now()
        FROM locked l WHERE x.id = l.id AND l.outcome = 'take'
        RETURNING x.id, x.run_seq, x.current_step, x.attempts, x.state
    )
    SELECT t.id, t.run_seq, 'take', t.current_step, t.attempts, t.state, NULL::text, NULL::double precision
    FROM taken t
    UNION ALL
    SELECT m.id, m.run_seq, 'missing', m.current_step, m.attempts, NULL::jsonb, m.message, NULL::double precision
    FROM missing m
    UNION ALL
    SELECT l.id, l.run_seq, l.outcome, l.current_step, l.attempts, NULL::jsonb,
           CASE l.outcome
               WHEN 'newer' THEN l.newer
               ELSE format('quiet window: no step starts until %s',
                           to_char(quiet AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'))
           END,
           CASE l.outcome
               WHEN 'newer' THEN 60::double precision
               ELSE greatest(1, extract(epoch FROM quiet - at))::double precision
           END
    FROM locked l WHERE l.outcome IN ('newer', 'quiet');
END $$;

-- v3: as v2, from the current holder of the step job's lease only; the others' finishes (late)
-- are journaled as 'late' and returned with status 'late', nothing else changed.
CREATE FUNCTION dispatch.finish_process_steps_v3(
    process_ids bigint[], run_seqs integer[], job_ids bigint[], tokens uuid[], steps text[], attempts integer[],
    worker_version integer,
    started_ats timestamptz[], results text[], messages text[], payloads jsonb[], states jsonb[],
    next_steps text[], delays double precision[], errors text[], continue_here boolean[], at timestamptz
) RETURNS TABLE (process_id bigint, run_seq integer, status text, step text, attempt integer, state jsonb)
    -- a row per instance finished; none: 'skip'
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(at);
    applied integer;
BEGIN
    IF EXISTS (SELECT FROM unnest(results) r WHERE r IS NULL OR r NOT IN ('done', 'retry', 'error')) THEN
        RAISE EXCEPTION 'dispatch.finish_process_steps_v3: result must be done, retry or error'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN QUERY
    WITH wanted AS (  -- of duplicate requests, one counts
        SELECT DISTINCT ON (r.id, r.run_seq) r.*
        FROM unnest(process_ids, run_seqs, job_ids, tokens, steps, attempts, started_ats, results, messages,
                    payloads, states, next_steps, delays, errors, continue_here)
            AS r (id, run_seq, job_id, token, step, attempt, started_at, result, message, payload, state,
                  next_step, delay, error, continue_here)
        -- ...from the current holder of the step job's lease.
        WHERE EXISTS (SELECT FROM dispatch.jobs j WHERE j.id = r.job_id AND j.lease_token = r.token
                                                    AND j.state = 'running')
    ), decided AS (
        SELECT w.*,
               CASE WHEN w.result = 'retry' THEN 'retry'
                    WHEN w.result = 'error' THEN 'error'
                    WHEN w.next_step IS NULL THEN 'done'
                    WHEN w.continue_here AND quiet IS NULL THEN 'running'
                    ELSE 'pending' END::dispatch.process_status AS new_status
        FROM wanted w JOIN dispatch.processes p ON p.id = w.id AND p.run_seq = w.run_seq
        -- Only for the step and attempt it was taken for: a late finish (its worker lost the
        -- lease, another took the step and went on in the same job) changes nothing.
        WHERE p.status = 'running' AND p.current_step = w.step AND p.attempts = w.attempt
        ORDER BY p.id
        FOR UPDATE OF p
    ), journaled AS (
        INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, payload, error, version,
                                              started_at)
        SELECT d.id, d.step, d.attempt, d.result, dispatch.mask_text(d.message),
               CASE WHEN d.payload IS NOT NULL THEN dispatch.mask_secrets(d.payload) END,
               CASE WHEN d.error IS NOT NULL THEN dispatch.mask_text(d.error) END, worker_version, d.started_at
        FROM decided d
    ), moved AS (
        UPDATE dispatch.processes x
        SET status = d.new_status,
            state = CASE WHEN d.result = 'done' THEN x.state || coalesce(d.state, '{}') ELSE x.state END,
            current_step = CASE WHEN d.result = 'done' THEN d.next_step ELSE x.current_step END,
            written_version = CASE WHEN d.result = 'done' THEN worker_version ELSE x.written_version END,
            attempts = CASE WHEN d.new_status = 'running' THEN 1 WHEN d.result = 'done' THEN 0 ELSE x.attempts END,
            error = CASE WHEN d.result <> 'done' THEN dispatch.mask_text(d.error) END,
            retry_after = CASE WHEN d.result = 'retry' THEN now() + make_interval(secs => d.delay) END,
            run_seq = CASE WHEN d.new_status IN ('retry', 'pending') THEN x.run_seq + 1 ELSE x.run_seq END,
            finished_at = CASE WHEN d.new_status = 'done' THEN now() END,
            updated_at = now()
        FROM decided d WHERE x.id = d.id
        RETURNING x.id, d.run_seq AS asked_seq, x.type, x.status, x.current_step, x.attempts, x.state, x.run_seq,
                  x.retry_after, x.written_version
    ), enqueued AS (
        INSERT INTO dispatch.jobs (queue, kind, args, run_at, max_attempts)
        SELECT t.queue, 'process:' || m.type,
               jsonb_build_object('process_id', m.id, 'run_seq', m.run_seq, 'version', m.written_version),
               greatest(coalesce(m.retry_after, quiet, now()), now()), 1000
        FROM moved m JOIN dispatch.process_types t ON t.type = m.type
        WHERE m.status IN ('retry', 'pending')
    )
    SELECT m.id, m.asked_seq, m.status::text, m.current_step, m.attempts,
           CASE WHEN m.status = 'running' THEN m.state END
    FROM moved m;
    GET DIAGNOSTICS applied = ROW_COUNT;
    IF applied < cardinality(process_ids) THEN
        -- Late finishes: their step ran (whatever it did outside is done), but the instance had
        -- moved on. Nothing of theirs is applied; the journal keeps them, marked 'late'.
        RETURN QUERY
        WITH late AS (
            INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, payload, error,
                                                  version, started_at)
            SELECT r.id, r.step, r.attempt, 'late',
                   format('%s, not applied: the instance had moved on (its step was taken again, or it was '
                          'restarted or abandoned) when this finish arrived', r.result),
                   CASE WHEN r.payload IS NOT NULL THEN dispatch.mask_secrets(r.payload) END,
                   CASE WHEN r.error IS NOT NULL THEN dispatch.mask_text(r.error) END, worker_version, r.started_at
            FROM unnest(process_ids, run_seqs, steps, attempts, started_ats, results, payloads, errors)
                AS r (id, run_seq, step, attempt, started_at, result, payload, error)
            WHERE EXISTS (SELECT FROM dispatch.processes p WHERE p.id = r.id)
              AND NOT EXISTS (SELECT FROM dispatch.process_history h
                              WHERE h.process_id = r.id AND h.step = r.step AND h.attempt = r.attempt
                                AND h.started_at IS NOT DISTINCT FROM r.started_at
                                AND h.status IN ('done', 'retry', 'error'))
            RETURNING process_id, step, attempt
        )
        SELECT l.process_id, NULL::integer, 'late', l.step, l.attempt, NULL::jsonb FROM late l;
    END IF;
END $$;

-- Moving the quiet window takes effect for what waits on it: steps deferred to the old window's
-- end come due at the new one's (or now).
CREATE FUNCTION dispatch.reschedule_quiet_steps() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    quiet timestamptz := dispatch.process_quiet_until(now());
    woken text[];
BEGIN
    WITH moved AS (
        UPDATE dispatch.jobs j
        SET run_at = greatest(now(), coalesce(quiet, now()), CASE WHEN p.status = 'retry' THEN p.retry_after END)
        FROM dispatch.processes p
        WHERE j.kind LIKE 'process:%' AND j.state = 'scheduled' AND j.run_at > now()
          AND p.id = (j.args ->> 'process_id')::bigint AND p.run_seq = (j.args ->> 'run_seq')::integer
          AND p.status IN ('pending', 'retry')
        RETURNING j.queue, j.run_at
    )
    SELECT array_agg(DISTINCT m.queue) INTO woken FROM moved m WHERE m.run_at <= now();
    PERFORM pg_notify('dispatch_jobs', q) FROM unnest(woken) q;
    RETURN NULL;
END $$;

CREATE TRIGGER process_settings_reschedule AFTER UPDATE ON dispatch.process_settings
    FOR EACH ROW WHEN (OLD IS DISTINCT FROM NEW) EXECUTE FUNCTION dispatch.reschedule_quiet_steps();

-- Finished process instances go with their journal; running ones keep theirs whole.
CREATE INDEX processes_finished_at ON dispatch.processes (finished_at) WHERE status IN ('done', 'abandoned');
CREATE FUNCTION dispatch.prune_processes_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT p.id FROM dispatch.processes p
        WHERE p.status IN ('done', 'abandoned') AND p.finished_at < now() - keep
        ORDER BY p.finished_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.processes p USING old o WHERE p.id = o.id RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- Process instances and their journals as the read-only role sees them: states, payloads,
-- messages and errors masked (the instances' table itself holds states as the steps wrote them).
CREATE VIEW dispatch.process_list AS
SELECT p.id, p.type, p.version, p.status, p.current_step, dispatch.mask_secrets(p.state) AS state, p.attempts,
       p.retry_after, dispatch.mask_text(p.error) AS error, p.idempotency_key, p.created_at, p.updated_at,
       p.finished_at, p.written_version
FROM dispatch.processes p;

CREATE VIEW dispatch.process_journal AS
SELECT h.id, h.process_id, h.step, h.attempt, h.status, dispatch.mask_text(h.message) AS message,
       dispatch.mask_secrets(h.payload) AS payload, dispatch.mask_text(h.error) AS error, h.version, h.started_at,
       h.finished_at
FROM dispatch.process_history h;

REVOKE SELECT ON dispatch.processes FROM dispatch_reader;
GRANT SELECT ON dispatch.process_list, dispatch.process_journal TO dispatch_reader, dispatch_worker;
