-- 0010: process steps taken and finished in batches. Kept in step with sql/schema.sql.

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
