-- 0014: CRM call events delivered (seed 004): a second CRM (webhook), each RetailCRM
-- enterprise's default shared limit, call events in batches, call-event attempts in
-- dispatch.integration_logs, dispatch.integration_status. Kept in step with sql/schema.sql.

-- The CRMs pgdispatch delivers call events to: RetailCRM's telephony API, and any system that
-- takes signed JSON webhooks (Standard Webhooks).
CREATE OR REPLACE FUNCTION dispatch.crm_integrations() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY['retailcrm', 'webhook'] $$;

CREATE OR REPLACE FUNCTION dispatch.integrations_config_problem(config jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN jsonb_typeof(config) IS DISTINCT FROM 'object' THEN 'integrations_config must be a JSON object'
        ELSE (
            SELECT string_agg(problem, '; ' ORDER BY key) FROM (
                SELECT i.key, CASE
                    WHEN NOT i.key = ANY (dispatch.crm_integrations()) THEN
                        format('%s: unknown integration; known: %s', i.key,
                               array_to_string(dispatch.crm_integrations(), ', '))
                    WHEN jsonb_typeof(i.value) <> 'object' THEN format('%s must be an object', i.key)
                    WHEN jsonb_typeof(i.value -> 'enabled') IS DISTINCT FROM 'boolean' THEN
                        format('%s.enabled must be true or false', i.key)
                    -- RetailCRM
                    WHEN i.key = 'retailcrm' AND coalesce(i.value ->> 'api_url', '') !~* '^https?://[^/\s]+' THEN
                        format('%s.api_url must be the account URL (https://ACCOUNT.retailcrm.ru)', i.key)
                    WHEN i.key = 'retailcrm' AND (jsonb_typeof(i.value -> 'api_key') IS DISTINCT FROM 'string'
                         OR btrim(i.value ->> 'api_key') = '') THEN
                        format('%s.api_key must be a non-empty string', i.key)
                    WHEN i.key = 'retailcrm' AND i.value ? 'client_id' AND jsonb_typeof(i.value -> 'client_id') <> 'string' THEN
                        format('%s.client_id must be a string', i.key)
                    WHEN i.key = 'retailcrm' AND i.value ? 'user_mappings' AND (jsonb_typeof(i.value -> 'user_mappings') <> 'object'
                         OR EXISTS (SELECT FROM jsonb_each(i.value -> 'user_mappings') m
                                    WHERE m.key !~ '^[0-9A-Za-z*#+]{1,32}$'
                                       OR jsonb_typeof(m.value) <> 'number')) THEN
                        format('%s.user_mappings must map extensions to CRM user ids ({"151": 16})', i.key)
                    -- Webhook
                    WHEN i.key = 'webhook' AND coalesce(i.value ->> 'url', '') !~* '^https?://[^/\s]+' THEN
                        format('%s.url must be an http(s) URL', i.key)
                    WHEN i.key = 'webhook' AND i.value ? 'secret' AND coalesce(i.value ->> 'secret', '') !~ '^whsec_[A-Za-z0-9+/=]{16,}$' THEN
                        format('%s.secret must be a Standard Webhooks secret (whsec_ and base64)', i.key)
                    WHEN i.key = 'webhook' AND i.value ? 'headers' AND (jsonb_typeof(i.value -> 'headers') <> 'object'
                         OR EXISTS (SELECT FROM jsonb_each(i.value -> 'headers') h WHERE jsonb_typeof(h.value) <> 'string')) THEN
                        format('%s.headers must map header names to strings', i.key)
                END AS problem
                FROM jsonb_each(config) i
            ) p WHERE problem IS NOT NULL)
    END
$$;

-- The shared limit key of an enterprise's CRM: its rate limit and concurrency cap (a rule
-- under this key), and, with the CRM's host appended, its circuit breaker.
CREATE FUNCTION dispatch.crm_limit_key(enterprise text, integration text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT format('tenant:enterprise:%s:%s', enterprise, integration) $$;

-- RetailCRM allows 10 requests/s per API key: each enterprise configured for it gets a shared
-- limit of 9/s with a burst of 1 (no second ever goes over 10) and at most 5 requests in
-- flight, across every worker and host. Operators change it with `pgdispatch limits set`.
CREATE FUNCTION dispatch.enterprise_default_limits() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.limits (key, rate, burst, concurrency, note)
    VALUES (dispatch.crm_limit_key(NEW.number, 'retailcrm'), 9.0, 1, 5,
            'RetailCRM: 10 requests/s per API key')
    ON CONFLICT (key) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER enterprises_default_limits AFTER INSERT OR UPDATE OF integrations_config ON dispatch.enterprises
    FOR EACH ROW WHEN (NEW.integrations_config ? 'retailcrm')
    EXECUTE FUNCTION dispatch.enterprise_default_limits();

-- Every attempt, of lead deliveries and of call events, as the engine recorded it (the
-- adapter's request and response excerpts are in its outcome), and every skipped lead
-- integration. Masked.
CREATE OR REPLACE VIEW dispatch.integration_logs AS
SELECT h.finished_at AS at, d.lead_id, d.batch_id, d.id AS delivery_id, d.credential_id, d.type,
       h.attempt, h.outcome AS status, h.status AS http_status, dispatch.mask_text(h.error) AS error,
       dispatch.mask_text(h.detail ->> 'request') AS request_excerpt,
       dispatch.mask_text(h.detail ->> 'response') AS response_excerpt,
       NULL::text AS enterprise, NULL::text AS call_unique_id, NULL::text AS event
FROM dispatch.job_history h
JOIN dispatch.deliveries d ON d.job_id = h.job_id
WHERE h.kind = 'lead.deliver'
UNION ALL
SELECT d.created_at, d.lead_id, d.batch_id, d.id, d.credential_id, d.type, 0, 'skipped', NULL, d.error, NULL, NULL,
       NULL, NULL, NULL
FROM dispatch.deliveries d
WHERE d.status = 'skipped'
UNION ALL
SELECT h.finished_at, NULL, NULL, NULL, NULL, c.integration,
       h.attempt, h.outcome, h.status, dispatch.mask_text(h.error),
       dispatch.mask_text(h.detail ->> 'request'), dispatch.mask_text(h.detail ->> 'response'),
       c.enterprise, c.call_unique_id, c.event
FROM dispatch.job_history h
JOIN dispatch.call_events c ON c.job_id = h.job_id
WHERE h.kind = 'crm.event';

-- Call events in a batch, for a telephony gateway that gathers what arrives within a few
-- milliseconds: one transaction (one durable commit, one NOTIFY) for many events, each as
-- dispatch.call_event would take it. `events`: a JSON array of {enterprise, event,
-- call_unique_id, payload}. An invalid element refuses the whole batch, naming it. Returns one
-- row per event and enabled CRM, with n, the element's position (from 1).
CREATE FUNCTION dispatch.call_events(events jsonb)
RETURNS TABLE (n integer, enterprise text, event text, call_unique_id text, integration text,
               job_id bigint, created boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    bad record;
    what text;
    made text[];
BEGIN
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'dispatch.call_events: events must be a JSON array of {enterprise, event, call_unique_id, payload}'
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT e.n, e.value, x.number AS known INTO bad
    FROM jsonb_array_elements(events) WITH ORDINALITY e (value, n)
    LEFT JOIN dispatch.enterprises x ON x.number = e.value ->> 'enterprise'
    WHERE jsonb_typeof(e.value) IS DISTINCT FROM 'object' OR x.number IS NULL
       OR (e.value ->> 'event') IS NULL OR (e.value ->> 'event') NOT IN ('dial', 'bridge', 'hangup', 'download')
       OR length(coalesce(e.value ->> 'call_unique_id', '')) NOT BETWEEN 1 AND 255
       OR jsonb_typeof(e.value -> 'payload') IS DISTINCT FROM 'object'
    ORDER BY e.n LIMIT 1;
    IF FOUND THEN
        what := CASE WHEN jsonb_array_length(events) = 1 THEN 'dispatch.call_event'
                     ELSE format('dispatch.call_events: events[%s]', bad.n) END;
        IF jsonb_typeof(bad.value) IS DISTINCT FROM 'object' THEN
            RAISE EXCEPTION '%: must be an object {enterprise, event, call_unique_id, payload}', what
                USING ERRCODE = 'check_violation';
        ELSIF bad.known IS NULL THEN
            RAISE EXCEPTION '%: no enterprise %', what, coalesce(bad.value ->> 'enterprise', 'NULL')
                USING ERRCODE = 'no_data_found';
        ELSIF (bad.value ->> 'event') IS NULL OR (bad.value ->> 'event') NOT IN ('dial', 'bridge', 'hangup', 'download') THEN
            RAISE EXCEPTION '%: event must be dial, bridge, hangup or download, got %', what,
                coalesce(bad.value ->> 'event', 'NULL') USING ERRCODE = 'check_violation';
        ELSIF length(coalesce(bad.value ->> 'call_unique_id', '')) NOT BETWEEN 1 AND 255 THEN
            RAISE EXCEPTION '%: call_unique_id must be 1 to 255 characters', what USING ERRCODE = 'check_violation';
        ELSE
            RAISE EXCEPTION '%: payload must be a JSON object', what USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    WITH recorded AS (
        INSERT INTO dispatch.call_events AS c (call_unique_id, event, integration, enterprise, job_id)
        SELECT t.call_unique_id, t.event, t.integration, t.enterprise,
               nextval(pg_get_serial_sequence('dispatch.jobs', 'id'))
        FROM dispatch.call_event_targets(events) t
        WHERE t.first
        ORDER BY t.call_unique_id, t.event, t.integration  -- one lock order: concurrent batches never deadlock
        ON CONFLICT ON CONSTRAINT call_events_pkey DO NOTHING  -- a duplicate, also a concurrent one
        RETURNING c.call_unique_id, c.event, c.integration, c.enterprise, c.job_id
    ), queued AS (
        INSERT INTO dispatch.jobs (id, queue, kind, args, tenant, idempotency_key)
        SELECT r.job_id, 'crm', 'crm.event',
               jsonb_build_object('enterprise', r.enterprise, 'integration', r.integration, 'event', r.event,
                                  'call_unique_id', r.call_unique_id, 'payload', t.payload),
               'enterprise:' || r.enterprise, format('call:%s:%s:%s', r.call_unique_id, r.event, r.integration)
        FROM recorded r
        JOIN dispatch.call_event_targets(events) t
          ON t.first AND (t.call_unique_id, t.event, t.integration) = (r.call_unique_id, r.event, r.integration)
    )
    SELECT coalesce(array_agg(concat_ws(':', r.call_unique_id, r.event, r.integration)), '{}') INTO made
    FROM recorded r;
    -- A statement of its own: it sees a concurrent duplicate's rows, committed meanwhile.
    RETURN QUERY
    SELECT t.n, t.enterprise, t.event, t.call_unique_id, t.integration, c.job_id,
           t.first AND concat_ws(':', t.call_unique_id, t.event, t.integration) = ANY (made)
    FROM dispatch.call_event_targets(events) t
    CROSS JOIN LATERAL (  -- LIMIT 1: an index lookup per target, however many the planner guesses
        SELECT c.job_id FROM dispatch.call_events c
        WHERE c.call_unique_id = t.call_unique_id AND c.event = t.event AND c.integration = t.integration
        LIMIT 1) c
    ORDER BY t.n, t.integration;
END $$;

-- Each (element, enabled CRM) of a batch; `first` marks the first element of each (call, event,
-- CRM), the one that makes the job when the batch repeats an event.
CREATE FUNCTION dispatch.call_event_targets(events jsonb)
RETURNS TABLE (n integer, enterprise text, event text, call_unique_id text, integration text,
               payload jsonb, first boolean)
LANGUAGE sql STABLE AS $$  -- no SET clause: inlined into call_events' statements (every name qualified)
    SELECT e.n::integer, x.number, e.value ->> 'event', e.value ->> 'call_unique_id', c.key, e.value -> 'payload',
           row_number() OVER (PARTITION BY e.value ->> 'call_unique_id', e.value ->> 'event', c.key ORDER BY e.n) = 1
    FROM jsonb_array_elements(events) WITH ORDINALITY e (value, n)
    CROSS JOIN LATERAL (  -- LIMIT 1: an index lookup per element, not a scan of every enterprise
        SELECT x.number, x.integrations_config FROM dispatch.enterprises x
        WHERE x.number = e.value ->> 'enterprise' LIMIT 1) x
    CROSS JOIN LATERAL jsonb_each(x.integrations_config) c
    WHERE (c.value ->> 'enabled')::boolean
$$;

-- One event: dispatch.call_events with a batch of one.
CREATE OR REPLACE FUNCTION dispatch.call_event(enterprise_number text, event text, call_unique_id text, payload jsonb)
RETURNS TABLE (integration text, job_id bigint, created boolean)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT b.integration, b.job_id, b.created
    FROM dispatch.call_events(jsonb_build_array(jsonb_build_object(
        'enterprise', enterprise_number, 'event', event, 'call_unique_id', call_unique_id, 'payload', payload))) b
$$;

-- Each enterprise's CRMs and their circuit breakers: cheap (no history), for /metrics.
CREATE VIEW dispatch.crm_breakers AS
SELECT e.number AS enterprise, i.key AS integration, coalesce((i.value ->> 'enabled')::boolean, false) AS enabled,
       CASE WHEN s.open_until IS NULL THEN 'closed'
            WHEN s.open_until > now() THEN 'open'
            ELSE 'half-open' END AS breaker,
       CASE WHEN s.open_until > now() THEN s.open_until END AS breaker_open_until,
       CASE WHEN s.open_until IS NOT NULL THEN s.open_reason END AS breaker_reason,
       CASE WHEN s.paused_until > now() THEN s.paused_until END AS paused_until
FROM dispatch.enterprises e
CROSS JOIN LATERAL jsonb_each(e.integrations_config) i
LEFT JOIN dispatch.limit_state s
    ON s.key = dispatch.crm_limit_key(e.number, i.key) || '|host:'
               || substring(coalesce(i.value ->> 'api_url', i.value ->> 'url') FROM '^[A-Za-z]+://(?:[^@/]*@)?([^/?#]+)');

-- Each enterprise's CRMs as operators want to see them: enabled, the last success and the last
-- failure of its call events, and its circuit breaker. No secrets. It reads each enterprise's
-- recent call events and their attempts: for operators (/stats, `crm status`), not for scrapes.
CREATE VIEW dispatch.integration_status AS
SELECT b.enterprise, b.integration, b.enabled,
       ok.finished_at AS last_success_at, bad.finished_at AS last_error_at,
       dispatch.mask_text(bad.error) AS last_error,
       b.breaker, b.breaker_open_until, b.breaker_reason, b.paused_until
FROM dispatch.crm_breakers b
LEFT JOIN LATERAL (
    SELECT h.finished_at FROM dispatch.call_events c JOIN dispatch.job_history h ON h.job_id = c.job_id
    WHERE c.enterprise = b.enterprise AND c.integration = b.integration AND h.kind = 'crm.event'
      AND h.outcome = 'completed'
    ORDER BY c.created_at DESC, h.finished_at DESC LIMIT 1) ok ON true
LEFT JOIN LATERAL (
    SELECT h.finished_at, h.error FROM dispatch.call_events c JOIN dispatch.job_history h ON h.job_id = c.job_id
    WHERE c.enterprise = b.enterprise AND c.integration = b.integration AND h.kind = 'crm.event'
      AND h.outcome <> 'completed'
    ORDER BY c.created_at DESC, h.finished_at DESC LIMIT 1) bad ON true;

GRANT SELECT ON dispatch.integration_logs, dispatch.integration_status, dispatch.crm_breakers
    TO dispatch_worker, dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.crm_limit_key(text, text) TO dispatch_reader;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer;
GRANT EXECUTE ON FUNCTION dispatch.call_events(jsonb) TO dispatch_producer;
