-- Outbound HTTP requests (kind http.request): send_request, signing keys, the host of a request.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

-- Keys the worker signs with. Only the worker role reads key material.
CREATE TABLE dispatch.signing_keys (
    name         text PRIMARY KEY
        CONSTRAINT signing_key_name_format CHECK (name ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    algorithm    text NOT NULL
        CONSTRAINT signing_key_algorithm_known CHECK (algorithm IN ('HS256', 'RS256', 'ES256')),
    secret       text NOT NULL
        CONSTRAINT signing_key_secret_not_empty CHECK (length(secret) > 0),
    ttl_seconds  integer NOT NULL DEFAULT 300
        CONSTRAINT signing_key_ttl_positive CHECK (ttl_seconds > 0),
    CONSTRAINT signing_key_hs256_secret_at_least_32_bytes CHECK (
        algorithm <> 'HS256' OR octet_length(secret) >= 32 OR secret LIKE 'whsec\_%'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER signing_keys_notify_change AFTER INSERT OR UPDATE OR DELETE ON dispatch.signing_keys
    FOR EACH STATEMENT EXECUTE FUNCTION dispatch.notify_config_change();

-- Enqueue one outbound HTTP request (kind http.request). Seed rules: 418 is always a stop code;
-- attempt_limit NULL means "as many intervals as fit before expire_at", or 1440 without expiry.
CREATE FUNCTION dispatch.send_request(
    method           text,
    uri              text,
    body             text DEFAULT NULL,
    expire_at        timestamptz DEFAULT NULL,
    success_code     integer DEFAULT 200,
    stop_codes       integer[] DEFAULT '{}',
    attempt_limit    integer DEFAULT NULL,
    attempt_interval integer DEFAULT 60,
    http_timeout     integer DEFAULT 30,
    queue            text DEFAULT 'requests',
    idempotency_key  text DEFAULT NULL,
    tenant           text DEFAULT NULL,
    claims           jsonb DEFAULT NULL,
    signing_key      text DEFAULT NULL,
    headers          jsonb DEFAULT NULL,
    webhook_key      text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    verb text := upper(method);
    codes integer[];
    budget integer := attempt_limit;
    bad text;
BEGIN
    IF verb IS NULL OR verb NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
        RAISE EXCEPTION 'dispatch.send_request: method must be one of GET, POST, PUT, PATCH, DELETE, got %',
            coalesce(quote_literal(method), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF uri IS NULL OR uri !~* '^https?://[^/?#\s]+([/?#]\S*)?$' THEN
        RAISE EXCEPTION 'dispatch.send_request: uri must be an absolute http(s) URL, got %',
            coalesce(quote_literal(left(uri, 200)), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF success_code IS NULL OR success_code NOT BETWEEN 100 AND 599 THEN
        RAISE EXCEPTION 'dispatch.send_request: success_code must be an HTTP status (100-599), got %',
            coalesce(success_code::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(c::text, ', ') INTO bad FROM unnest(stop_codes) c WHERE c IS NULL OR c NOT BETWEEN 100 AND 599;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.send_request: stop_codes must be HTTP statuses (100-599), got %', bad
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO codes
    FROM unnest(coalesce(stop_codes, '{}') || 418) c WHERE c <> success_code;
    IF attempt_interval IS NULL OR attempt_interval < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_interval must be >= 1 second, got %',
            coalesce(attempt_interval::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF http_timeout IS NULL OR http_timeout NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'dispatch.send_request: http_timeout must be 1-3600 seconds, got %',
            coalesce(http_timeout::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NOT NULL AND budget < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_limit must be >= 1, got %', budget
            USING ERRCODE = 'check_violation';
    END IF;
    IF claims IS NOT NULL THEN
        IF jsonb_typeof(claims) <> 'object' THEN
            RAISE EXCEPTION 'dispatch.send_request: claims must be a JSON object, got %', jsonb_typeof(claims)
                USING ERRCODE = 'check_violation';
        END IF;
        IF body IS NOT NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: give body or claims, not both'
                USING ERRCODE = 'check_violation';
        END IF;
        IF signing_key IS NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: claims need a signing_key'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF signing_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = signing_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(signing_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF webhook_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = webhook_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(webhook_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF headers IS NOT NULL AND (jsonb_typeof(headers) <> 'object'
            OR EXISTS (SELECT 1 FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string'
                                                              OR h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$')) THEN
        RAISE EXCEPTION 'dispatch.send_request: headers must be a JSON object of header names to strings'
            USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NULL THEN
        budget := CASE WHEN expire_at IS NULL THEN 1440
                       ELSE greatest(1, ceil(extract(epoch FROM expire_at - now()) / attempt_interval)::integer)
                  END;
    END IF;
    RETURN dispatch.enqueue(
        'http.request',
        jsonb_strip_nulls(jsonb_build_object(
            'method', verb, 'uri', uri, 'body', body, 'success_code', success_code,
            'stop_codes', to_jsonb(codes), 'attempt_interval', attempt_interval,
            'http_timeout', http_timeout, 'claims', claims, 'signing_key', signing_key,
            'headers', headers, 'webhook_key', webhook_key)),
        queue => queue, expire_at => expire_at, max_attempts => budget,
        idempotency_key => idempotency_key, tenant => tenant);
END $$;

-- Every attempt of every request: a view over the engine's partitioned history, so it is cheap
-- to keep and pruned with it. Never holds request headers, JWTs or key material.
CREATE VIEW dispatch.request_attempts AS
SELECT h.job_id, h.attempt, coalesce((h.detail ->> 'started_at')::timestamptz, h.started_at) AS started_at,
       (h.detail ->> 'duration_ms')::integer AS duration_ms, h.status, h.outcome,
       h.detail ->> 'error_class' AS error_class, dispatch.mask_text(h.error) AS error_message,
       dispatch.mask_text(h.detail ->> 'response_body') AS response_body,
       dispatch.mask_secrets(h.detail -> 'response_headers') AS response_headers,
       h.finished_at
FROM dispatch.job_history h
WHERE h.kind = 'http.request';

REVOKE ALL ON dispatch.signing_keys, dispatch.request_attempts FROM PUBLIC;
REVOKE ALL ON FUNCTION dispatch.send_request(text, text, text, timestamptz, integer, integer[], integer,
    integer, integer, text, text, text, jsonb, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.send_request(text, text, text, timestamptz, integer, integer[], integer,
    integer, integer, text, text, text, jsonb, text, jsonb, text) TO dispatch_producer, dispatch_worker;
GRANT SELECT ON dispatch.signing_keys TO dispatch_worker;
GRANT SELECT ON dispatch.request_attempts TO dispatch_worker, dispatch_reader;

-- The host a request goes to, as limit keys name it: host[:port], lower case, no userinfo.
CREATE FUNCTION dispatch.request_host(args jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT lower(substring(args ->> 'uri' FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)'))
$$;

-- Requests waiting for a key that cannot send them now leave the claim's way, scheduled for
-- when it can: the first (by claim order) at `first_at`, the others from `others_at` on, one
-- every `spacing`. An open breaker: the first carries the probe when the cooldown ends, the
-- others wait a cooldown more (or come back when the probe succeeds: unpark_requests_v1). A
-- rate limit: one every 1/rate seconds, so they come back as tokens do, not all at once.
CREATE FUNCTION dispatch.park_requests_v1(host text, tenant text, first_at timestamptz,
                                          others_at timestamptz, spacing interval, reason text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    WITH locked AS (
        SELECT j.id, j.priority, j.run_at
        FROM dispatch.jobs j
        WHERE j.kind = 'http.request' AND j.state <> 'running' AND j.run_at < first_at
          AND dispatch.request_host(j.args) = park_requests_v1.host
          AND (park_requests_v1.tenant IS NULL OR j.tenant = park_requests_v1.tenant)
        FOR UPDATE SKIP LOCKED
    ), waiting AS (
        SELECT l.id, row_number() OVER (ORDER BY l.priority, l.run_at, l.id) AS nth FROM locked l
    )
    UPDATE dispatch.jobs j
    SET state = 'scheduled', last_error = reason,
        run_at = CASE WHEN w.nth = 1 THEN first_at ELSE others_at + (w.nth - 2) * spacing END
    FROM waiting w WHERE j.id = w.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

CREATE FUNCTION dispatch.unpark_requests_v1(host text, tenant text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
    woken text[];
BEGIN
    WITH back AS (
        UPDATE dispatch.jobs j SET state = 'available', run_at = now()
        WHERE j.kind = 'http.request' AND j.state = 'scheduled' AND j.last_error LIKE 'not sent: %'
          AND dispatch.request_host(j.args) = unpark_requests_v1.host
          AND (unpark_requests_v1.tenant IS NULL OR j.tenant = unpark_requests_v1.tenant)
        RETURNING j.queue
    )
    SELECT count(*), array_agg(DISTINCT b.queue) INTO n, woken FROM back b;
    PERFORM pg_notify('dispatch_jobs', q) FROM unnest(woken) q;
    RETURN n;
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

-- send_request: header values are checked too (CR, LF), not only their names.
CREATE OR REPLACE FUNCTION dispatch.send_request(
    method           text,
    uri              text,
    body             text DEFAULT NULL,
    expire_at        timestamptz DEFAULT NULL,
    success_code     integer DEFAULT 200,
    stop_codes       integer[] DEFAULT '{}',
    attempt_limit    integer DEFAULT NULL,
    attempt_interval integer DEFAULT 60,
    http_timeout     integer DEFAULT 30,
    queue            text DEFAULT 'requests',
    idempotency_key  text DEFAULT NULL,
    tenant           text DEFAULT NULL,
    claims           jsonb DEFAULT NULL,
    signing_key      text DEFAULT NULL,
    headers          jsonb DEFAULT NULL,
    webhook_key      text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    verb text := upper(method);
    codes integer[];
    budget integer := attempt_limit;
    bad text;
BEGIN
    IF verb IS NULL OR verb NOT IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') THEN
        RAISE EXCEPTION 'dispatch.send_request: method must be one of GET, POST, PUT, PATCH, DELETE, got %',
            coalesce(quote_literal(method), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF uri IS NULL OR uri !~* '^https?://[^/?#\s]+([/?#]\S*)?$' THEN
        RAISE EXCEPTION 'dispatch.send_request: uri must be an absolute http(s) URL, got %',
            coalesce(quote_literal(left(uri, 200)), 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF success_code IS NULL OR success_code NOT BETWEEN 100 AND 599 THEN
        RAISE EXCEPTION 'dispatch.send_request: success_code must be an HTTP status (100-599), got %',
            coalesce(success_code::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    SELECT string_agg(c::text, ', ') INTO bad FROM unnest(stop_codes) c WHERE c IS NULL OR c NOT BETWEEN 100 AND 599;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.send_request: stop_codes must be HTTP statuses (100-599), got %', bad
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO codes
    FROM unnest(coalesce(stop_codes, '{}') || 418) c WHERE c <> success_code;
    IF attempt_interval IS NULL OR attempt_interval < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_interval must be >= 1 second, got %',
            coalesce(attempt_interval::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF http_timeout IS NULL OR http_timeout NOT BETWEEN 1 AND 3600 THEN
        RAISE EXCEPTION 'dispatch.send_request: http_timeout must be 1-3600 seconds, got %',
            coalesce(http_timeout::text, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NOT NULL AND budget < 1 THEN
        RAISE EXCEPTION 'dispatch.send_request: attempt_limit must be >= 1, got %', budget
            USING ERRCODE = 'check_violation';
    END IF;
    IF claims IS NOT NULL THEN
        IF jsonb_typeof(claims) <> 'object' THEN
            RAISE EXCEPTION 'dispatch.send_request: claims must be a JSON object, got %', jsonb_typeof(claims)
                USING ERRCODE = 'check_violation';
        END IF;
        IF body IS NOT NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: give body or claims, not both'
                USING ERRCODE = 'check_violation';
        END IF;
        IF signing_key IS NULL THEN
            RAISE EXCEPTION 'dispatch.send_request: claims need a signing_key'
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    IF signing_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = signing_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(signing_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF webhook_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM dispatch.signing_keys k WHERE k.name = webhook_key) THEN
        RAISE EXCEPTION 'dispatch.send_request: no signing key named %', quote_literal(webhook_key)
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF headers IS NOT NULL AND (jsonb_typeof(headers) <> 'object'
            OR EXISTS (SELECT 1 FROM jsonb_each(headers) h WHERE jsonb_typeof(h.value) <> 'string'
                                                              OR h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$')) THEN
        RAISE EXCEPTION 'dispatch.send_request: headers must be a JSON object of header names to strings'
            USING ERRCODE = 'check_violation';
    END IF;
    -- A line break in a value would fail every attempt in the HTTP client (or, worse, add a
    -- header of the producer's choosing): refused here, named.
    SELECT string_agg(quote_literal(h.key), ', ') INTO bad FROM jsonb_each_text(headers) h
    WHERE h.value ~ '[\r\n]';
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'dispatch.send_request: header %: a header value holds no CR, LF or NUL', bad
            USING ERRCODE = 'check_violation';
    END IF;
    IF budget IS NULL THEN
        budget := CASE WHEN expire_at IS NULL THEN 1440
                       ELSE greatest(1, ceil(extract(epoch FROM expire_at - now()) / attempt_interval)::integer)
                  END;
    END IF;
    RETURN dispatch.enqueue(
        'http.request',
        jsonb_strip_nulls(jsonb_build_object(
            'method', verb, 'uri', uri, 'body', body, 'success_code', success_code,
            'stop_codes', to_jsonb(codes), 'attempt_interval', attempt_interval,
            'http_timeout', http_timeout, 'claims', claims, 'signing_key', signing_key,
            'headers', headers, 'webhook_key', webhook_key)),
        queue => queue, expire_at => expire_at, max_attempts => budget,
        idempotency_key => idempotency_key, tenant => tenant);
END $$;
