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

-- The host of a request as limit keys name it, said as worker/outbound/hosts.py says it: lower
-- case, no userinfo, no trailing dot, no port when it is the scheme's default, IPv6 in brackets.
-- request_host (v1) kept the dot and the default port: `API.Example.com.:443` was another host.
CREATE FUNCTION dispatch.request_host_v2(args jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN m IS NULL THEN NULL
                ELSE rtrim(m[2], '.')
                     || CASE WHEN coalesce(ltrim(m[3], '0'), '') = ''
                               OR (m[1] = 'http' AND ltrim(m[3], '0') = '80')
                               OR (m[1] = 'https' AND ltrim(m[3], '0') = '443') THEN ''
                             ELSE ':' || ltrim(m[3], '0') END
           END
    FROM (SELECT regexp_match(lower(args ->> 'uri'),
                              '^([a-z][a-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]*))?(?:[/?#]|$)') AS m) x
$$;

-- Waiting requests by host (and tenant): a park or a spread reads the key's own requests, never
-- the whole queue with a regex per row.
CREATE INDEX jobs_request_host ON dispatch.jobs (dispatch.request_host_v2(args), tenant)
    WHERE kind = 'http.request' AND state <> 'running';

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

-- Requests waiting for a key that cannot send them now (an open breaker, a pause) leave the
-- claim's way: the first (by claim order) at `first_at`, to carry the probe, the others at
-- `others_at`. By index (jobs_request_host), and skipped when another worker is parking the same
-- key right now (a hundred 429s in flight make one park, not a hundred scans). Returns how many.
CREATE FUNCTION dispatch.park_requests_v2(limit_key text, host text, tenant text, first_at timestamptz,
                                          others_at timestamptz, reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    IF host IS NULL OR NOT pg_try_advisory_xact_lock(hashtextextended('dispatch.park:' || limit_key, 0)) THEN
        RETURN 0;
    END IF;
    WITH locked AS (
        SELECT j.id, j.priority, j.run_at
        FROM dispatch.jobs j
        WHERE dispatch.request_host_v2(j.args) = park_requests_v2.host
          AND (park_requests_v2.tenant IS NULL OR j.tenant = park_requests_v2.tenant)
          AND j.kind = 'http.request' AND j.state <> 'running' AND j.run_at < first_at
        FOR UPDATE SKIP LOCKED
    ), waiting AS (
        SELECT l.id, row_number() OVER (ORDER BY l.priority, l.run_at, l.id) AS nth FROM locked l
    )
    UPDATE dispatch.jobs j
    SET state = 'scheduled', last_error = reason, run_at = CASE WHEN w.nth = 1 THEN first_at ELSE others_at END
    FROM waiting w WHERE j.id = w.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The probe succeeded (or an operator reset the key): its parked requests come back now.
CREATE FUNCTION dispatch.unpark_requests_v2(host text, tenant text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
    woken text[];
BEGIN
    IF host IS NULL THEN
        RETURN 0;
    END IF;
    WITH back AS (
        UPDATE dispatch.jobs j SET state = 'available', run_at = now()
        WHERE dispatch.request_host_v2(j.args) = unpark_requests_v2.host
          AND (unpark_requests_v2.tenant IS NULL OR j.tenant = unpark_requests_v2.tenant)
          AND j.kind = 'http.request' AND j.state = 'scheduled' AND j.last_error LIKE 'not sent: %'
        RETURNING j.queue
    )
    SELECT count(*), array_agg(DISTINCT b.queue) INTO n, woken FROM back b;
    PERFORM pg_notify('dispatch_jobs', q) FROM unnest(woken) q;
    RETURN n;
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

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
