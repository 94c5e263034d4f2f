-- Retention (the second review): every table that grows has a window and is pruned by the
-- elected maintenance duty, in batches, by index. A capability registers its tables here (a row
-- naming its prune function); the engine runs whatever is registered and knows none of their
-- tables. Commands are scheduled at a constant cost per tick, however long their history.

CREATE TABLE dispatch.retention (
    name      text PRIMARY KEY,
    -- prune(keep interval, max_rows integer) RETURNS integer: deletes at most max_rows rows
    -- older than keep (by index), returns how many; maintenance calls it until it returns fewer.
    prune     regprocedure NOT NULL,
    keep      interval NOT NULL CONSTRAINT retention_keep_positive CHECK (keep > interval '0'),
    note      text NOT NULL,
    pruned_at timestamptz,
    pruned    bigint NOT NULL DEFAULT 0  -- rows deleted since it was registered
);
COMMENT ON TABLE dispatch.retention IS
    'What maintenance prunes, and how long it keeps it: change a window with UPDATE dispatch.retention SET keep = ...';

-- One batch of one registered table (the maintenance duty calls it until it returns < max_rows).
CREATE FUNCTION dispatch.prune_retention_v1(retention_name text, max_rows integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r dispatch.retention;
    n integer;
BEGIN
    SELECT * INTO r FROM dispatch.retention x WHERE x.name = retention_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no retention named %', retention_name USING ERRCODE = 'no_data_found';
    END IF;
    EXECUTE format('SELECT %s($1, $2)', r.prune::regproc) INTO n USING r.keep, max_rows;
    UPDATE dispatch.retention x SET pruned_at = now(), pruned = x.pruned + n WHERE x.name = retention_name;
    RETURN n;
END $$;

-- Call events: their record is what makes an event idempotent, so it is kept while its job lives
-- and for the window after (a repeat of an older call is new work by then).
CREATE INDEX call_events_created_at ON dispatch.call_events (created_at);
CREATE FUNCTION dispatch.prune_call_events_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT c.call_unique_id, c.event, c.integration FROM dispatch.call_events c
        WHERE c.created_at < now() - keep AND NOT EXISTS (SELECT FROM dispatch.jobs j WHERE j.id = c.job_id)
        ORDER BY c.created_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.call_events c USING old o
        WHERE (c.call_unique_id, c.event, c.integration) = (o.call_unique_id, o.event, o.integration)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- Lead sends: a batch goes with its deliveries once none is pending; a lead, once it has no batch.
CREATE INDEX lead_batches_created_at ON dispatch.lead_batches (created_at);
CREATE FUNCTION dispatch.prune_lead_batches_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT b.id FROM dispatch.lead_batches b
        WHERE b.created_at < now() - keep
          AND NOT EXISTS (SELECT FROM dispatch.deliveries d WHERE d.batch_id = b.id AND d.status = 'pending')
        ORDER BY b.created_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.lead_batches b USING old o WHERE b.id = o.id RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

CREATE INDEX leads_created_at ON dispatch.leads (created_at);
CREATE FUNCTION dispatch.prune_leads_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT l.id FROM dispatch.leads l
        WHERE l.created_at < now() - keep AND NOT EXISTS (SELECT FROM dispatch.lead_batches b WHERE b.lead_id = l.id)
        ORDER BY l.created_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.leads l USING old o WHERE l.id = o.id RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

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

CREATE INDEX audit_log_at ON dispatch.audit_log (at);
CREATE FUNCTION dispatch.prune_audit_log_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM dispatch.audit_log a
        WHERE a.id IN (SELECT x.id FROM dispatch.audit_log x WHERE x.at < now() - keep ORDER BY x.at LIMIT max_rows)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- Command runs: each command keeps its latest (command_status reads it).
CREATE INDEX command_runs_created_at ON dispatch.command_runs (created_at);
CREATE INDEX command_runs_latest ON dispatch.command_runs (key, created_at DESC);
CREATE FUNCTION dispatch.prune_command_runs_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT r.key, r.tick FROM dispatch.command_runs r
        WHERE r.created_at < now() - keep
          AND EXISTS (SELECT FROM dispatch.command_runs n WHERE n.key = r.key AND n.created_at > r.created_at)
        ORDER BY r.created_at LIMIT max_rows
    ), gone AS (
        DELETE FROM dispatch.command_runs r USING old o WHERE (r.key, r.tick) = (o.key, o.tick) RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

-- The state of limit keys no longer in use (host:* makes one per host ever reached): nothing
-- paused, no breaker, no slot, no spread, untouched for the window. No index on refilled_at,
-- on purpose: every token block updates it, and an index would take HOT updates away from the
-- hottest row there is; the table is unlogged and small next to the jobs, and is walked once.
CREATE FUNCTION dispatch.prune_limit_state_v1(keep interval, max_rows integer) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH old AS (
        SELECT s.key FROM dispatch.limit_state s
        WHERE s.refilled_at < now() - keep AND s.open_until IS NULL
          AND (s.paused_until IS NULL OR s.paused_until < now())
          AND (s.backlog_until IS NULL OR s.backlog_until < now())
          AND NOT EXISTS (SELECT FROM dispatch.limit_slots l WHERE l.key = s.key)
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM dispatch.limit_state s USING old o WHERE s.key = o.key RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$$;

INSERT INTO dispatch.retention (name, prune, keep, note) VALUES
    ('call_events', 'dispatch.prune_call_events_v1(interval, integer)', '14 days',
     'call events whose job is gone (their attempts are in job_history, kept 14 days by default)'),
    ('lead_batches', 'dispatch.prune_lead_batches_v1(interval, integer)', '30 days',
     'lead sends and their deliveries, once none is pending'),
    ('leads', 'dispatch.prune_leads_v1(interval, integer)', '90 days', 'leads with no send left'),
    ('processes', 'dispatch.prune_processes_v1(interval, integer)', '30 days',
     'finished (done, abandoned) process instances and their journal'),
    ('audit_log', 'dispatch.prune_audit_log_v1(interval, integer)', '365 days', 'operators'' actions'),
    ('command_runs', 'dispatch.prune_command_runs_v1(interval, integer)', '30 days',
     'command runs (each command keeps its latest)'),
    ('limit_state', 'dispatch.prune_limit_state_v1(interval, integer)', '7 days',
     'the state of limit keys no longer in use');

-- Give `tick` of a command its run (as v1), at a constant cost: "the previous run is still
-- going" looks at the latest run only (runs are one at a time, so no older one can be live),
-- and old runs are pruned by maintenance, not here under the command's row lock.
CREATE FUNCTION dispatch.schedule_command_v2(command_key text, tick timestamptz, next_tick timestamptz,
                                             manual boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c dispatch.commands;
    new_id bigint;
BEGIN
    SELECT * INTO c FROM dispatch.commands WHERE key = command_key FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no command %', command_key USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT manual AND tick <= c.last_tick THEN
        RETURN NULL;  -- given (or skipped) already
    END IF;
    UPDATE dispatch.commands SET last_tick = greatest(last_tick, CASE WHEN manual THEN last_tick ELSE tick END),
                                 next_tick = coalesce(schedule_command_v2.next_tick, commands.next_tick)
    WHERE key = command_key;
    IF NOT manual AND (NOT c.enabled OR (SELECT all_disabled FROM dispatch.command_switch)) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT FROM dispatch.jobs j
               WHERE j.id = (SELECT r.job_id FROM dispatch.command_runs r WHERE r.key = command_key
                             ORDER BY r.created_at DESC LIMIT 1)) THEN
        RETURN NULL;  -- the previous run is still queued or running: one at a time
    END IF;
    new_id := nextval(pg_get_serial_sequence('dispatch.jobs', 'id'));
    INSERT INTO dispatch.command_runs (key, tick, job_id, manual) VALUES (command_key, tick, new_id, manual)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;  -- another worker gave this tick its run
    END IF;
    INSERT INTO dispatch.jobs (id, queue, kind, args, max_attempts)
    VALUES (new_id, c.queue, 'command:' || command_key,
            jsonb_build_object('args', c.args, 'tick', tick, 'manual', manual), 1);
    RETURN new_id;
END $$;

-- v1 (workers of the previous release) at the same cost.
CREATE OR REPLACE FUNCTION dispatch.schedule_command_v1(command_key text, tick timestamptz, next_tick timestamptz,
                                                        manual boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT dispatch.schedule_command_v2(command_key, tick, next_tick, manual)
$$;

-- The latest run and the latest finished one, read by index: constant cost however many runs.
CREATE OR REPLACE VIEW dispatch.command_status AS
SELECT c.key, c.name, c.args, c.schedule, c.queue,
       CASE WHEN run.state = 'running' AND run.lease_expires_at <= now() THEN 'Locked'
            WHEN run.state = 'running' THEN 'Working'
            WHEN run.state IS NOT NULL THEN 'Queued'
            WHEN NOT c.enabled OR switch.all_disabled THEN 'Disabled'
            ELSE 'Idle' END AS status,
       c.enabled AND NOT switch.all_disabled AS enabled,
       run.leased_by AS holder, run.leased_at AS since, run.lease_expires_at AS expires,
       last.finished_at AS last_run, last.outcome AS last_outcome, dispatch.mask_text(last.error) AS last_error,
       c.next_tick AS next_run
FROM dispatch.commands c
-- One row, read once: a join would let the planner guess thousands of rows for the never-analysed
-- switch, multiply every cost by them and cross PostgreSQL's JIT threshold (half a second per call).
CROSS JOIN (SELECT coalesce((SELECT w.all_disabled FROM dispatch.command_switch w), false) AS all_disabled) switch
LEFT JOIN LATERAL (
    SELECT j.state, j.leased_by, j.leased_at, j.lease_expires_at
    FROM (SELECT r.job_id FROM dispatch.command_runs r WHERE r.key = c.key ORDER BY r.created_at DESC LIMIT 1) r
    JOIN dispatch.jobs j ON j.id = r.job_id
) run ON true
LEFT JOIN LATERAL (
    SELECT h.finished_at, h.outcome::text AS outcome, h.error
    FROM (SELECT r.job_id FROM dispatch.command_runs r WHERE r.key = c.key ORDER BY r.created_at DESC LIMIT 2) r
    CROSS JOIN LATERAL (SELECT x.finished_at, x.outcome, x.error FROM dispatch.job_history x
                        WHERE x.job_id = r.job_id ORDER BY x.finished_at DESC LIMIT 1) h
    ORDER BY h.finished_at DESC LIMIT 1
) last ON true;

GRANT SELECT ON dispatch.retention TO dispatch_worker, dispatch_reader;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
