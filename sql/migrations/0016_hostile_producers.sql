-- Hostile producers (the second review): a producer role is another system we do not control.

-- Absurd nesting is refused where it is cheap, at insert: every claim that included a job of
-- 10,000 nested arrays failed to decode it, and its whole batch with it. (Workers also decode
-- each job on its own: a row from before this check dies alone as 'invalid'.)
ALTER TABLE dispatch.jobs ADD CONSTRAINT job_args_nesting_at_most_100
    CHECK (NOT jsonb_path_exists(args, 'strict $.**{101}'));

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
