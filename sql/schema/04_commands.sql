-- Periodic commands: their schedule, ticks and runs, the switches.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

CREATE TABLE dispatch.commands (
    key           text PRIMARY KEY
        CONSTRAINT command_key_format CHECK (key ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    name          text NOT NULL,
    args          jsonb NOT NULL DEFAULT '[]'
        CONSTRAINT command_args_must_be_a_json_array CHECK (jsonb_typeof(args) = 'array'),
    schedule      text NOT NULL,
    queue         text NOT NULL DEFAULT 'default'
        CONSTRAINT command_queue_must_exist_in_dispatch_queues REFERENCES dispatch.queues (name) ON UPDATE CASCADE,
    lock_seconds  integer NOT NULL DEFAULT 300
        CONSTRAINT command_lock_positive CHECK (lock_seconds > 0),
    enabled       boolean NOT NULL DEFAULT true,
    last_tick     timestamptz,  -- the latest tick that was given a run (or skipped on purpose)
    next_tick     timestamptz,  -- the next tick, as the workers' scheduler computed it
    registered_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dispatch.commands IS
    'Periodic commands: written by workers from their App at start (name, args, schedule, queue, lock); enabled is the operators'' switch.';

-- The switch for all commands at once (the seed's all-commands.disabled).
CREATE TABLE dispatch.command_switch (
    one          boolean PRIMARY KEY DEFAULT true CONSTRAINT command_switch_single_row CHECK (one),
    all_disabled boolean NOT NULL DEFAULT false
);
INSERT INTO dispatch.command_switch DEFAULT VALUES;

-- One row per (command, tick): the unique key that makes a tick run once in all the workers.
CREATE TABLE dispatch.command_runs (
    key        text NOT NULL REFERENCES dispatch.commands (key) ON DELETE CASCADE,
    tick       timestamptz NOT NULL,
    job_id     bigint NOT NULL,
    manual     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, tick)
);

-- A worker's App, at start: the definition is the code's; the switch stays the operators'. A
-- new command's first run is its next tick, not the ones before it was registered.
CREATE FUNCTION dispatch.register_command_v1(command_key text, name text, args jsonb, schedule text,
                                             queue text, lock_seconds integer, next_tick timestamptz)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO dispatch.commands AS c (key, name, args, schedule, queue, lock_seconds, last_tick, next_tick)
    VALUES (command_key, name, args, schedule, coalesce(queue, 'default'), lock_seconds, now(), next_tick)
    ON CONFLICT (key) DO UPDATE
        SET name = excluded.name, args = excluded.args, schedule = excluded.schedule,
            queue = excluded.queue, lock_seconds = excluded.lock_seconds,
            next_tick = CASE WHEN c.schedule = excluded.schedule THEN c.next_tick ELSE excluded.next_tick END;
$$;

-- Give `tick` of a command its run: a job of kind command:<key>, at most one per (key, tick)
-- whichever worker asks first. A scheduled tick is skipped (recorded, no run) while the command
-- is disabled or its previous run is still going (the lock); `manual` (commands run) overrides
-- the switch but not the lock. Returns the job id, or NULL when skipped or already given.
CREATE FUNCTION dispatch.schedule_command_v1(command_key text, tick timestamptz, next_tick timestamptz,
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
                                 next_tick = coalesce(schedule_command_v1.next_tick, commands.next_tick)
    WHERE key = command_key;
    IF NOT manual AND (NOT c.enabled OR (SELECT all_disabled FROM dispatch.command_switch)) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM dispatch.command_runs r JOIN dispatch.jobs j ON j.id = r.job_id
               WHERE r.key = command_key) THEN
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
    DELETE FROM dispatch.command_runs r
    WHERE r.key = command_key AND r.created_at < now() - interval '30 days';
    RETURN new_id;
END $$;

-- Switches, as data; every action audited.
CREATE FUNCTION dispatch.switch_command_v1(command_key text, enable boolean, who text, reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    IF command_key IS NULL THEN  -- all commands
        UPDATE dispatch.command_switch SET all_disabled = NOT enable;
        n := 1;
    ELSE
        UPDATE dispatch.commands SET enabled = enable WHERE key = command_key;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF n > 0 THEN
        INSERT INTO dispatch.audit_log (who, action, target, reason)
        VALUES (who, CASE WHEN enable THEN 'enable' ELSE 'disable' END,
                'command:' || coalesce(command_key, '*'), reason);
    END IF;
    RETURN n;
END $$;

-- A lock left by a run whose worker died (its lease ran out): the run is given up (dead,
-- 'discarded'), so the next tick may run. Returns how many were released.
CREATE FUNCTION dispatch.unlock_command_v1(command_key text, who text, reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    -- The engine's own finish, with the stale lease's token: dead 'discarded', in the history.
    SELECT coalesce(sum(dispatch.finish_jobs_v2(
               ARRAY[j.id], ARRAY[j.lease_token], ARRAY['dead'], ARRAY[NULL::double precision],
               ARRAY['discarded'], ARRAY[format('unlocked by %s: %s', who, coalesce(reason, 'stale lock'))],
               ARRAY[NULL::integer], ARRAY[NULL::jsonb])), 0)
    INTO n
    FROM dispatch.command_runs r JOIN dispatch.jobs j ON j.id = r.job_id
    WHERE r.key = command_key AND j.state = 'running' AND j.lease_expires_at <= now();
    INSERT INTO dispatch.audit_log (who, action, target, reason)
    VALUES (who, 'unlock', 'command:' || command_key, reason);
    RETURN n;
END $$;

-- What each command is doing: Locked (a run whose lease ran out: its worker died), Working,
-- Queued (a run waits for a worker: it will start, even if disabled since), Disabled, Idle;
-- the lock (holder, since, expires), the last run and the next.
CREATE VIEW dispatch.command_status AS
SELECT c.key, c.name, c.args, c.schedule, c.queue,
       CASE WHEN run.state = 'running' AND run.lease_expires_at <= now() THEN 'Locked'
            WHEN run.state = 'running' THEN 'Working'
            WHEN run.state IS NOT NULL THEN 'Queued'
            WHEN NOT c.enabled OR s.all_disabled THEN 'Disabled'
            ELSE 'Idle' END AS status,
       c.enabled AND NOT s.all_disabled AS enabled,
       run.leased_by AS holder, run.leased_at AS since, run.lease_expires_at AS expires,
       last.finished_at AS last_run, last.outcome AS last_outcome, dispatch.mask_text(last.error) AS last_error,
       c.next_tick AS next_run
FROM dispatch.commands c
CROSS JOIN dispatch.command_switch s
LEFT JOIN LATERAL (
    SELECT j.state, j.leased_by, j.leased_at, j.lease_expires_at
    FROM dispatch.command_runs r JOIN dispatch.jobs j ON j.id = r.job_id
    WHERE r.key = c.key ORDER BY r.tick DESC LIMIT 1
) run ON true
LEFT JOIN LATERAL (
    SELECT h.finished_at, h.outcome::text AS outcome, h.error
    FROM dispatch.command_runs r JOIN dispatch.job_history h ON h.job_id = r.job_id
    WHERE r.key = c.key ORDER BY h.finished_at DESC LIMIT 1
) last ON true;

GRANT SELECT, INSERT, UPDATE ON dispatch.commands, dispatch.command_runs TO dispatch_worker;
GRANT SELECT ON dispatch.command_switch, dispatch.audit_log TO dispatch_worker;
GRANT SELECT ON dispatch.command_status, dispatch.commands, dispatch.audit_log TO dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.register_command_v1(text, text, jsonb, text, text, integer, timestamptz),
    dispatch.schedule_command_v1(text, timestamptz, timestamptz, boolean),
    dispatch.switch_command_v1(text, boolean, text, text),
    dispatch.unlock_command_v1(text, text, text) TO dispatch_worker;

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
