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

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
