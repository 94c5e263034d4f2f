-- Shared limits and circuit breakers: rules, their live state, slots, tokens, pauses, parks.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

-- ---------------------------------------------------------------------------------------------
-- Shared limits: rate limits, concurrency caps, circuit breakers and pauses that hold across
-- every worker process and host (worker/outbound/limits.py).
--
-- A job resolves to limit keys: host:<host[:port]>, tenant:<tenant>, and tenant:<t>|host:<h>.
-- A row of dispatch.limits applies to a key by name, or by a pattern with * for a part
-- (host:* is "each host on its own", tenant:*|host:* "each tenant at each host").
-- ---------------------------------------------------------------------------------------------
CREATE TABLE dispatch.limits (
    key              text PRIMARY KEY
        CONSTRAINT limit_key_format CHECK (key ~ '^(tenant:[^|[:space:]]+\|host:[^|[:space:]]+|tenant:[^|[:space:]]+|host:[^|[:space:]]+)$'),
    rate             double precision
        CONSTRAINT limit_rate_positive CHECK (rate > 0),
    burst            integer
        CONSTRAINT limit_burst_at_least_1 CHECK (burst >= 1),
    concurrency      integer
        CONSTRAINT limit_concurrency_at_least_1 CHECK (concurrency >= 1),
    breaker_failures integer
        CONSTRAINT limit_breaker_failures_at_least_1 CHECK (breaker_failures >= 1),
    breaker_cooldown interval
        CONSTRAINT limit_breaker_cooldown_positive CHECK (breaker_cooldown > '0'),
    note             text,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT limit_burst_needs_a_rate CHECK (burst IS NULL OR rate IS NOT NULL)
);
COMMENT ON TABLE dispatch.limits IS
    'Limits shared by every worker: rate (requests per second, bucket of burst, default one second''s worth), concurrency (requests in flight across all workers), breaker thresholds (default: the workers'' --breaker-failures / --breaker-cooldown).';

CREATE TRIGGER limits_notify_change AFTER INSERT OR UPDATE OR DELETE ON dispatch.limits
    FOR EACH STATEMENT EXECUTE FUNCTION dispatch.notify_config_change();
CREATE TRIGGER limits_touch_updated_at BEFORE UPDATE ON dispatch.limits
    FOR EACH ROW EXECUTE FUNCTION dispatch.touch_updated_at();

-- The live state of each key in use. Unlogged: it is rebuilt as workers go (a crash of the
-- server resets buckets to full and closes breakers), and it takes the writes of every worker.
CREATE UNLOGGED TABLE dispatch.limit_state (
    key              text PRIMARY KEY,
    tokens           double precision NOT NULL DEFAULT 0,
    refilled_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    paused_until     timestamptz,
    pause_reason     text,
    open_until       timestamptz,
    open_reason      text,
    probe_holder     text,
    probe_expires_at timestamptz
);

-- Concurrency slots: each worker process holds a count per key, as a lease it renews; a worker
-- killed with slots in hand loses them when the lease runs out.
CREATE UNLOGGED TABLE dispatch.limit_slots (
    key        text NOT NULL,
    holder     text NOT NULL,
    slots      integer NOT NULL CONSTRAINT limit_slots_not_negative CHECK (slots >= 0),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, holder)
);

-- Tokens in a block: a worker takes up to `want` at once and spends them within a second, so
-- the hot row sees one update per block, not one per request.
CREATE FUNCTION dispatch.take_tokens_v1(limit_key text, rate double precision, burst integer, want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    available double precision;
    given integer;
BEGIN
    INSERT INTO dispatch.limit_state AS s (key, tokens) VALUES (limit_key, burst)
    ON CONFLICT (key) DO NOTHING;
    SELECT least(burst::double precision,
                 s.tokens + greatest(0, extract(epoch FROM clock_timestamp() - s.refilled_at)) * rate)
    INTO available FROM dispatch.limit_state s WHERE s.key = limit_key FOR UPDATE;
    given := least(want, floor(available))::integer;
    UPDATE dispatch.limit_state s SET tokens = available - given, refilled_at = clock_timestamp()
    WHERE s.key = limit_key;
    RETURN QUERY SELECT given, CASE WHEN given > 0 THEN 0::double precision
                                    ELSE (1 - available) / rate END;
END $$;

-- Up to `want` more slots for `holder`, never more than `cap` held by live leases in all.
-- Returns how many were granted.
CREATE FUNCTION dispatch.acquire_slots_v1(limit_key text, holder text, cap integer, want integer,
                                          lease interval)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    in_use integer;
    given integer;
BEGIN
    INSERT INTO dispatch.limit_state AS s (key) VALUES (limit_key) ON CONFLICT (key) DO NOTHING;
    PERFORM 1 FROM dispatch.limit_state s WHERE s.key = limit_key FOR UPDATE;  -- one at a time per key
    SELECT coalesce(sum(l.slots), 0) INTO in_use FROM dispatch.limit_slots l
    WHERE l.key = limit_key AND l.expires_at > now();
    given := greatest(0, least(want, cap - in_use));
    IF given > 0 THEN
        INSERT INTO dispatch.limit_slots AS l (key, holder, slots, expires_at)
        VALUES (limit_key, holder, given, now() + lease)
        ON CONFLICT (key, holder) DO UPDATE
            SET slots = CASE WHEN l.expires_at > now() THEN l.slots ELSE 0 END + excluded.slots,
                expires_at = excluded.expires_at;
    END IF;
    RETURN given;
END $$;

CREATE FUNCTION dispatch.release_slots_v1(limit_key text, holder text, n integer)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.limit_slots l SET slots = greatest(0, l.slots - n)
    WHERE l.key = limit_key AND l.holder = release_slots_v1.holder;
    DELETE FROM dispatch.limit_slots l
    WHERE l.key = limit_key AND l.holder = release_slots_v1.holder AND l.slots = 0;
$$;

-- The heartbeat of a holder's slots; also forgets leases that ran out (killed workers).
CREATE FUNCTION dispatch.renew_slots_v1(holder text, lease interval)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.limit_slots l SET expires_at = now() + lease WHERE l.holder = renew_slots_v1.holder;
    DELETE FROM dispatch.limit_slots l WHERE l.expires_at < now() - interval '1 minute';
$$;

-- Breakers and pauses: written on transitions only, announced on dispatch_config.
CREATE FUNCTION dispatch.notify_limit_state(limit_key text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_notify('dispatch_config', json_build_object(
        'table', 'limit_state', 'key', s.key,
        'paused_for', greatest(0, extract(epoch FROM s.paused_until - now())), 'pause_reason', s.pause_reason,
        'open_for', greatest(0, extract(epoch FROM s.open_until - now())), 'open_reason', s.open_reason)::text)
    FROM dispatch.limit_state s WHERE s.key = limit_key;
$$;

-- Open (or keep open) a key's breaker until now + cooldown. Returns false when it was already
-- open (another worker saw the failures first): nothing to announce then.
CREATE FUNCTION dispatch.open_breaker_v1(limit_key text, cooldown interval, reason text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.limit_state AS s (key) VALUES (limit_key) ON CONFLICT (key) DO NOTHING;
    UPDATE dispatch.limit_state s
    SET open_until = now() + cooldown, open_reason = reason, probe_holder = NULL, probe_expires_at = NULL
    WHERE s.key = limit_key AND (s.open_until IS NULL OR s.open_until <= now() OR s.probe_holder IS NOT NULL);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM dispatch.notify_limit_state(limit_key);
    RETURN true;
END $$;

-- After the cooldown, exactly one worker of all gets to send the probe (compare-and-set).
CREATE FUNCTION dispatch.take_probe_v1(limit_key text, holder text, probe_lease interval)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.limit_state s SET probe_holder = holder, probe_expires_at = now() + probe_lease
    WHERE s.key = limit_key AND s.open_until <= now()
      AND (s.probe_holder IS NULL OR s.probe_expires_at <= now())
    RETURNING true;
$$;

CREATE FUNCTION dispatch.close_breaker_v1(limit_key text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE dispatch.limit_state s
    SET open_until = NULL, open_reason = NULL, probe_holder = NULL, probe_expires_at = NULL
    WHERE s.key = limit_key AND s.open_until IS NOT NULL;
    IF FOUND THEN
        PERFORM dispatch.notify_limit_state(limit_key);
    END IF;
END $$;

-- A 429/503 with Retry-After: the key sends nothing until then, in any worker.
CREATE FUNCTION dispatch.pause_limit_v1(limit_key text, until timestamptz, reason text)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.limit_state AS s (key) VALUES (limit_key) ON CONFLICT (key) DO NOTHING;
    UPDATE dispatch.limit_state s SET paused_until = until, pause_reason = reason
    WHERE s.key = limit_key AND (s.paused_until IS NULL OR s.paused_until < until);
    IF FOUND THEN
        PERFORM dispatch.notify_limit_state(limit_key);
    END IF;
END $$;

-- What each key does now: its rule (by name or pattern), tokens, requests in flight across all
-- workers, breaker, pause, and why.
CREATE VIEW dispatch.limit_status AS
SELECT coalesce(s.key, l.key) AS key,
       l.rate, coalesce(l.burst, ceil(l.rate)::integer) AS burst, l.concurrency,
       CASE WHEN s.key IS NULL OR l.rate IS NULL THEN NULL
            ELSE round(least(coalesce(l.burst, ceil(l.rate))::double precision,
                             s.tokens + extract(epoch FROM clock_timestamp() - s.refilled_at) * l.rate)::numeric, 1)
       END AS tokens,
       coalesce((SELECT sum(x.slots) FROM dispatch.limit_slots x
                 WHERE x.key = s.key AND x.expires_at > now()), 0)::integer AS in_flight,
       CASE WHEN s.open_until IS NULL THEN 'closed'
            WHEN s.open_until > now() THEN 'open'
            ELSE 'half-open' END AS breaker,
       CASE WHEN s.paused_until > now() THEN s.paused_until END AS paused_until,
       CASE WHEN s.paused_until > now() THEN s.pause_reason
            WHEN s.open_until IS NOT NULL THEN s.open_reason END AS why
FROM dispatch.limit_state s
FULL JOIN dispatch.limits l ON l.key = s.key;

REVOKE ALL ON dispatch.limit_state, dispatch.limit_slots FROM PUBLIC;
GRANT SELECT ON dispatch.limits TO dispatch_worker, dispatch_reader;
GRANT SELECT ON dispatch.limit_state, dispatch.limit_slots TO dispatch_worker;
GRANT SELECT ON dispatch.limit_status TO dispatch_worker, dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.take_tokens_v1(text, double precision, integer, integer),
    dispatch.acquire_slots_v1(text, text, integer, integer, interval),
    dispatch.release_slots_v1(text, text, integer), dispatch.renew_slots_v1(text, interval),
    dispatch.open_breaker_v1(text, interval, text), dispatch.take_probe_v1(text, text, interval),
    dispatch.close_breaker_v1(text), dispatch.pause_limit_v1(text, timestamptz, text),
    dispatch.park_requests_v1(text, text, timestamptz, timestamptz, interval, text),
    dispatch.unpark_requests_v1(text, text), dispatch.request_host(jsonb) TO dispatch_worker;

CREATE FUNCTION dispatch.drop_probe_v1(limit_key text, holder text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.limit_state s SET probe_holder = NULL, probe_expires_at = NULL
    WHERE s.key = limit_key AND s.probe_holder = drop_probe_v1.holder;
$$;

CREATE FUNCTION dispatch.release_all_slots_v1(holder text)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM dispatch.limit_slots l WHERE l.holder = release_all_slots_v1.holder;
$$;

GRANT EXECUTE ON FUNCTION dispatch.drop_probe_v1(text, text), dispatch.release_all_slots_v1(text)
    TO dispatch_worker;

-- An operator's reset: the key's pause lifted, its breaker closed, its parked requests back.
CREATE FUNCTION dispatch.reset_limit_v1(limit_key text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    host text := substring(limit_key FROM 'host:([^|]+)$');
    tenant text := substring(limit_key FROM '^tenant:([^|]+)\|');
BEGIN
    UPDATE dispatch.limit_state s
    SET paused_until = NULL, pause_reason = NULL, open_until = NULL, open_reason = NULL,
        probe_holder = NULL, probe_expires_at = NULL
    WHERE s.key = limit_key;
    IF FOUND THEN
        PERFORM dispatch.notify_limit_state(limit_key);
    END IF;
    IF host IS NULL THEN
        RETURN 0;
    END IF;
    RETURN dispatch.unpark_requests_v1(host, tenant);
END $$;

-- Shared limits that bind (the second review): token blocks granted ahead of time, the backlog
-- of a rate-limited key spread by its send times, host keys said one way, parks by index and
-- one at a time, slot leases reconciled with what each worker holds. The _v1 functions stay for
-- workers of the previous release.

-- The time up to which a rate-limited key's send times are given out (spread_backlog_v1).
ALTER TABLE dispatch.limit_state ADD COLUMN backlog_until timestamptz;

-- A block of `want` tokens. The bucket may go below zero: when it holds less than one token, the
-- whole block is granted ahead of time, usable in `ready_in` seconds (when the refill has paid it
-- back), provided that is within `max_wait`; so workers that wait queue for the bucket instead of
-- each taking the single token it holds, one update at a time. Nothing granted: no write, and
-- `ready_in` says when one token would be there.
CREATE FUNCTION dispatch.take_tokens_v2(limit_key text, rate double precision, burst integer, want integer,
                                        max_wait double precision)
RETURNS TABLE (granted integer, ready_in double precision)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    available double precision;
    given integer;
    ready double precision := 0;
BEGIN
    INSERT INTO dispatch.limit_state AS s (key, tokens) VALUES (limit_key, burst)
    ON CONFLICT (key) DO NOTHING;
    SELECT least(burst::double precision,
                 s.tokens + greatest(0, extract(epoch FROM clock_timestamp() - s.refilled_at)) * rate)
    INTO available FROM dispatch.limit_state s WHERE s.key = limit_key FOR UPDATE;
    IF available >= 1 THEN
        given := least(want, floor(available))::integer;
    ELSE
        given := want;
        ready := (want - available) / rate;
        IF ready > max_wait THEN
            RETURN QUERY SELECT 0, (1 - available) / rate;
            RETURN;
        END IF;
    END IF;
    UPDATE dispatch.limit_state s SET tokens = available - given, refilled_at = clock_timestamp()
    WHERE s.key = limit_key;
    RETURN QUERY SELECT given, ready;
END $$;

-- A rate-limited key whose tokens cannot serve its requests within a few seconds: the caller's
-- `waiting` requests (in its worker slots) get the key's next free send times, one every 1/rate,
-- after the times already given (backlog_until), and then, when `host` is given, the key's
-- queued requests that would be claimed now are scheduled after them, so the claim does not hand
-- them out only to have them put back. The key's row lock makes it one spread per key at a time
-- across every worker. Returns how many queued requests it scheduled, and the first time.
CREATE FUNCTION dispatch.spread_backlog_v1(limit_key text, host text, tenant text, rate double precision,
                                           burst integer, waiting integer, reason text)
RETURNS TABLE (parked integer, first_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s dispatch.limit_state;
    at_now timestamptz := clock_timestamp();
    available double precision;
    start_at timestamptz;
    spacing interval := make_interval(secs => 1 / rate);
    n integer := 0;
BEGIN
    INSERT INTO dispatch.limit_state (key, tokens) VALUES (limit_key, burst) ON CONFLICT (key) DO NOTHING;
    SELECT * INTO s FROM dispatch.limit_state x WHERE x.key = limit_key FOR UPDATE;
    available := least(burst::double precision,
                       s.tokens + greatest(0, extract(epoch FROM at_now - s.refilled_at)) * rate);
    start_at := greatest(at_now + make_interval(secs => greatest(0, 1 - available) / rate),
                         coalesce(s.backlog_until, at_now));
    IF host IS NOT NULL THEN
        WITH queued AS (
            SELECT j.id, j.priority, j.run_at
            FROM dispatch.jobs j
            WHERE dispatch.request_host_v2(j.args) = spread_backlog_v1.host
              AND (spread_backlog_v1.tenant IS NULL OR j.tenant = spread_backlog_v1.tenant)
              AND j.kind = 'http.request' AND j.state <> 'running' AND j.run_at <= at_now
            FOR UPDATE SKIP LOCKED
        ), turns AS (
            SELECT q.id, row_number() OVER (ORDER BY q.priority, q.run_at, q.id) AS nth FROM queued q
        )
        UPDATE dispatch.jobs j
        SET state = 'scheduled', last_error = reason, run_at = start_at + (waiting + t.nth - 1) * spacing
        FROM turns t WHERE j.id = t.id;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    UPDATE dispatch.limit_state x SET backlog_until = start_at + (waiting + n) * spacing WHERE x.key = limit_key;
    RETURN QUERY SELECT n, start_at;
END $$;

-- A 429/503 with Retry-After: the key sends nothing until then, in any worker. Returns whether
-- it extended the pause by more than a second (false: another worker's pause, or another answer
-- of the same burst of 429s, covers it already; nothing to announce, nothing to park).
CREATE FUNCTION dispatch.pause_limit_v2(limit_key text, until timestamptz, reason text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.limit_state AS s (key) VALUES (limit_key) ON CONFLICT (key) DO NOTHING;
    UPDATE dispatch.limit_state s SET paused_until = until, pause_reason = reason
    WHERE s.key = limit_key AND (s.paused_until IS NULL OR s.paused_until < until - interval '1 second');
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM dispatch.notify_limit_state(limit_key);
    RETURN true;
END $$;

-- The heartbeat of a holder's slots: its rows become exactly what it holds in memory (`keys`,
-- `counts`), with a fresh lease; any other row of the holder goes. A slot granted to a caller
-- that was cancelled before it could be recorded, or one whose return failed, is thus dropped at
-- the next beat instead of being renewed for ever. Also forgets leases that ran out.
CREATE FUNCTION dispatch.renew_slots_v2(holder text, keys text[], counts integer[], lease interval)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM dispatch.limit_slots l
    WHERE l.holder = renew_slots_v2.holder AND NOT l.key = ANY (keys);
    INSERT INTO dispatch.limit_slots AS l (key, holder, slots, expires_at)
    SELECT h.key, renew_slots_v2.holder, h.n, now() + lease FROM unnest(keys, counts) AS h (key, n)
    WHERE h.n > 0
    ON CONFLICT (key, holder) DO UPDATE SET slots = excluded.slots, expires_at = excluded.expires_at;
    DELETE FROM dispatch.limit_slots l WHERE l.expires_at < now() - interval '1 minute';
$$;

-- A key's tenant part as a producer's tenant (worker/outbound/limits.py tenant_part encodes
-- %, |, :, * and spaces as %XX).
CREATE FUNCTION dispatch.decode_tenant_part(part text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    decoded bytea := '';
    i integer := 1;
    raw bytea := convert_to(part, 'UTF8');
BEGIN
    WHILE i <= length(raw) LOOP
        IF get_byte(raw, i - 1) = 37 AND i + 2 <= length(raw)
           AND convert_from(substring(raw FROM i + 1 FOR 2), 'UTF8') ~ '^[0-9A-Fa-f]{2}$' THEN
            decoded := decoded || decode(convert_from(substring(raw FROM i + 1 FOR 2), 'UTF8'), 'hex');
            i := i + 3;
        ELSE
            decoded := decoded || substring(raw FROM i FOR 1);
            i := i + 1;
        END IF;
    END LOOP;
    RETURN convert_from(decoded, 'UTF8');
END $$;

-- An operator's reset: the key's pause lifted, its breaker closed, its spread and its bucket
-- forgotten, its parked requests back.
CREATE FUNCTION dispatch.reset_limit_v2(limit_key text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    host text := substring(limit_key FROM 'host:([^|]+)$');
    tenant text := dispatch.decode_tenant_part(substring(limit_key FROM '^tenant:([^|]+)\|'));
BEGIN
    UPDATE dispatch.limit_state s
    SET paused_until = NULL, pause_reason = NULL, open_until = NULL, open_reason = NULL,
        probe_holder = NULL, probe_expires_at = NULL, backlog_until = NULL
    WHERE s.key = limit_key;
    IF FOUND THEN
        PERFORM dispatch.notify_limit_state(limit_key);
    END IF;
    IF host IS NULL THEN
        RETURN 0;
    END IF;
    RETURN dispatch.unpark_requests_v2(host, tenant);
END $$;

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
DELETE FROM dispatch.limits l
WHERE l.key LIKE 'tenant:credential:%' AND (l.rate, l.burst, l.note) IN (
    (25.0, 5, 'Telegram: about 30 messages/s per bot'),
    (2.0, 45, 'Bitrix24: leaky bucket per portal, blocks at 50, drains 2/s'),
    (6.0, 1, 'amoCRM: at most 7 requests/s'))
  AND l.concurrency IS NULL AND l.breaker_failures IS NULL AND l.breaker_cooldown IS NULL;
