-- 0014: CRM call events delivered (seed 004): a second CRM (webhook), each RetailCRM
-- enterprise's default shared limit, call-event attempts in dispatch.integration_logs,
-- dispatch.integration_status. Kept in step with sql/schema.sql.

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

-- Each enterprise's CRMs as operators want to see them: enabled, the last success and the last
-- failure of its call events, and its circuit breaker. No secrets.
CREATE VIEW dispatch.integration_status AS
SELECT e.number AS enterprise, i.key AS integration, coalesce((i.value ->> 'enabled')::boolean, false) AS enabled,
       ok.finished_at AS last_success_at, bad.finished_at AS last_error_at,
       dispatch.mask_text(bad.error) AS last_error,
       CASE WHEN s.open_until IS NULL THEN 'closed'
            WHEN s.open_until > now() THEN 'open'
            ELSE 'half-open' END AS breaker,
       CASE WHEN s.open_until > now() THEN s.open_until END AS breaker_open_until,
       CASE WHEN s.open_until IS NOT NULL THEN s.open_reason END AS breaker_reason,
       CASE WHEN s.paused_until > now() THEN s.paused_until END AS paused_until
FROM dispatch.enterprises e
CROSS JOIN LATERAL jsonb_each(e.integrations_config) i
LEFT JOIN LATERAL (
    SELECT h.finished_at FROM dispatch.call_events c JOIN dispatch.job_history h ON h.job_id = c.job_id
    WHERE c.enterprise = e.number AND c.integration = i.key AND h.kind = 'crm.event' AND h.outcome = 'completed'
    ORDER BY c.created_at DESC, h.finished_at DESC LIMIT 1) ok ON true
LEFT JOIN LATERAL (
    SELECT h.finished_at, h.error FROM dispatch.call_events c JOIN dispatch.job_history h ON h.job_id = c.job_id
    WHERE c.enterprise = e.number AND c.integration = i.key AND h.kind = 'crm.event' AND h.outcome <> 'completed'
    ORDER BY c.created_at DESC, h.finished_at DESC LIMIT 1) bad ON true
LEFT JOIN dispatch.limit_state s
    ON s.key = dispatch.crm_limit_key(e.number, i.key) || '|host:'
               || substring(coalesce(i.value ->> 'api_url', i.value ->> 'url') FROM '^[A-Za-z]+://(?:[^@/]*@)?([^/?#]+)');

GRANT SELECT ON dispatch.integration_logs, dispatch.integration_status TO dispatch_worker, dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.crm_limit_key(text, text) TO dispatch_reader;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer;
