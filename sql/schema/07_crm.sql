-- CRM call events: enterprises and their integrations config, call events, breakers, outcomes.
-- (One part of the fresh schema, applied in file order; the migrations build the same.)

-- Every delivery attempt, as the engine recorded it (the adapter's request and response
-- excerpts are in its outcome), and every skipped integration. Masked.
CREATE VIEW dispatch.integration_logs AS
SELECT h.finished_at AS at, d.lead_id, d.batch_id, d.id AS delivery_id, d.credential_id, d.type,
       h.attempt, h.outcome AS status, h.status AS http_status, dispatch.mask_text(h.error) AS error,
       dispatch.mask_text(h.detail ->> 'request') AS request_excerpt,
       dispatch.mask_text(h.detail ->> 'response') AS response_excerpt
FROM dispatch.job_history h
JOIN dispatch.deliveries d ON d.job_id = h.job_id
WHERE h.kind = 'lead.deliver'
UNION ALL
SELECT d.created_at, d.lead_id, d.batch_id, d.id, d.credential_id, d.type, 0, 'skipped', NULL, d.error, NULL, NULL
FROM dispatch.deliveries d
WHERE d.status = 'skipped';
GRANT SELECT ON dispatch.leads, dispatch.entity_credentials, dispatch.project_credentials,
    dispatch.integration_logs, dispatch.credentials_masked TO dispatch_worker, dispatch_reader;

-- ---------------------------------------------------------------------------------------------
-- CRM call events (seed 004). Each enterprise (a telephony tenant) keeps its integrations'
-- config in one JSONB document; workers cache it and are told of every committed change on
-- the config channel. A call event fans out to one job per enabled CRM of the enterprise,
-- once per (call, event, CRM) however often the telephony side sends it.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE dispatch.enterprises (
    number              text PRIMARY KEY
        CONSTRAINT enterprise_number_format CHECK (number ~ '^[A-Za-z0-9_.-]{1,64}$'),
    name                text NOT NULL,
    integrations_config jsonb NOT NULL DEFAULT '{}',  -- secrets inside: the worker role only
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- The CRMs pgdispatch delivers call events to.
CREATE FUNCTION dispatch.crm_integrations() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY['retailcrm'] $$;

-- What is wrong with an enterprise's integrations config, in words; NULL when nothing is.
CREATE FUNCTION dispatch.integrations_config_problem(config jsonb) RETURNS text
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
                    WHEN coalesce(i.value ->> 'api_url', '') !~* '^https?://[^/\s]+' THEN
                        format('%s.api_url must be the account URL (https://ACCOUNT.retailcrm.ru)', i.key)
                    WHEN jsonb_typeof(i.value -> 'api_key') IS DISTINCT FROM 'string'
                         OR btrim(i.value ->> 'api_key') = '' THEN
                        format('%s.api_key must be a non-empty string', i.key)
                    WHEN i.value ? 'client_id' AND jsonb_typeof(i.value -> 'client_id') <> 'string' THEN
                        format('%s.client_id must be a string', i.key)
                    WHEN i.value ? 'user_mappings' AND (jsonb_typeof(i.value -> 'user_mappings') <> 'object'
                         OR EXISTS (SELECT FROM jsonb_each(i.value -> 'user_mappings') m
                                    WHERE m.key !~ '^[0-9A-Za-z*#+]{1,32}$'
                                       OR jsonb_typeof(m.value) <> 'number')) THEN
                        format('%s.user_mappings must map extensions to CRM user ids ({"151": 16})', i.key)
                END AS problem
                FROM jsonb_each(config) i
            ) p WHERE problem IS NOT NULL)
    END
$$;

CREATE FUNCTION dispatch.check_enterprise() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    problem text := dispatch.integrations_config_problem(NEW.integrations_config);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'enterprise %: %', NEW.number, problem USING ERRCODE = 'check_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER enterprises_checked BEFORE INSERT OR UPDATE ON dispatch.enterprises
    FOR EACH ROW EXECUTE FUNCTION dispatch.check_enterprise();

-- After every committed change (NOTIFY is delivered at commit): one small message per changed
-- (enterprise, integration), or one "reload all" (no enterprise) when a statement changed many.
CREATE FUNCTION dispatch.notify_enterprise_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changes jsonb[];
    message jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT jsonb_build_object('enterprise', n.number, 'integration', k)) INTO changes
        FROM new_rows n, jsonb_object_keys(n.integrations_config) k;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT jsonb_build_object('enterprise', o.number, 'integration', k)) INTO changes
        FROM old_rows o, jsonb_object_keys(o.integrations_config) k;
    ELSE
        SELECT array_agg(DISTINCT jsonb_build_object('enterprise', coalesce(n.number, o.number), 'integration', k))
        INTO changes
        FROM new_rows n FULL JOIN old_rows o ON o.number = n.number,
             LATERAL (SELECT jsonb_object_keys(coalesce(n.integrations_config, '{}'))
                      UNION SELECT jsonb_object_keys(coalesce(o.integrations_config, '{}'))) keys (k)
        WHERE n.integrations_config -> k IS DISTINCT FROM o.integrations_config -> k
           OR n.number IS DISTINCT FROM o.number;
    END IF;
    IF cardinality(changes) > 100 THEN
        PERFORM pg_notify('dispatch_config', json_build_object('table', 'enterprises')::text);
        RETURN NULL;
    END IF;
    FOREACH message IN ARRAY coalesce(changes, '{}') LOOP
        PERFORM pg_notify('dispatch_config', (jsonb_build_object('table', 'enterprises') || message)::text);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER enterprises_notify_insert AFTER INSERT ON dispatch.enterprises
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION dispatch.notify_enterprise_change();
CREATE TRIGGER enterprises_notify_update AFTER UPDATE ON dispatch.enterprises
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION dispatch.notify_enterprise_change();
CREATE TRIGGER enterprises_notify_delete AFTER DELETE ON dispatch.enterprises
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION dispatch.notify_enterprise_change();

-- Call events, once per (call, event, CRM): the record of each, and its job.
CREATE TABLE dispatch.call_events (
    call_unique_id text NOT NULL CONSTRAINT call_unique_id_length CHECK (length(call_unique_id) BETWEEN 1 AND 255),
    event          text NOT NULL CONSTRAINT call_event_known CHECK (event IN ('dial', 'bridge', 'hangup', 'download')),
    integration    text NOT NULL,
    enterprise     text NOT NULL REFERENCES dispatch.enterprises (number) ON DELETE CASCADE,
    job_id         bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_unique_id, event, integration)
);
CREATE INDEX call_events_enterprise ON dispatch.call_events (enterprise, created_at);

-- Short timeouts and few retries (the seed: 2-3 s, 2-3 tries, exponential backoff): a call
-- event is worth little after a minute.
INSERT INTO dispatch.queues (name, max_attempts, job_timeout, backoff_base, backoff_factor, backoff_cap)
VALUES ('crm', 3, '10 seconds', '1 second', 3, '30 seconds')
ON CONFLICT (name) DO NOTHING;

-- A call event from the telephony side: one job per enabled CRM of the enterprise; the same
-- (call, event, CRM) again creates nothing and returns the job made the first time. Returns at
-- once: the CRM calls happen in the workers.
CREATE FUNCTION dispatch.call_event(enterprise_number text, event text, call_unique_id text, payload jsonb)
RETURNS TABLE (integration text, job_id bigint, created boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    e dispatch.enterprises;
    enabled text[];
    made text[];
BEGIN
    SELECT * INTO e FROM dispatch.enterprises x WHERE x.number = enterprise_number;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dispatch.call_event: no enterprise %', coalesce(enterprise_number, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF event IS NULL OR event NOT IN ('dial', 'bridge', 'hangup', 'download') THEN
        RAISE EXCEPTION 'dispatch.call_event: event must be dial, bridge, hangup or download, got %',
            coalesce(event, 'NULL') USING ERRCODE = 'check_violation';
    END IF;
    IF payload IS NULL OR jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION 'dispatch.call_event: payload must be a JSON object' USING ERRCODE = 'check_violation';
    END IF;
    SELECT coalesce(array_agg(i.key ORDER BY i.key), '{}') INTO enabled
    FROM jsonb_each(e.integrations_config) i WHERE (i.value ->> 'enabled')::boolean;
    WITH recorded AS (
        INSERT INTO dispatch.call_events AS c (call_unique_id, event, integration, enterprise, job_id)
        SELECT call_unique_id, event, crm, e.number, nextval(pg_get_serial_sequence('dispatch.jobs', 'id'))
        FROM unnest(enabled) crm
        ON CONFLICT ON CONSTRAINT call_events_pkey DO NOTHING  -- a duplicate, also a concurrent one
        RETURNING c.integration, c.job_id
    ), queued AS (
        INSERT INTO dispatch.jobs (id, queue, kind, args, tenant, idempotency_key)
        SELECT r.job_id, 'crm', 'crm.event',
               jsonb_build_object('enterprise', e.number, 'integration', r.integration, 'event', event,
                                  'call_unique_id', call_unique_id, 'payload', payload),
               'enterprise:' || e.number, format('call:%s:%s:%s', call_unique_id, event, r.integration)
        FROM recorded r
    )
    SELECT coalesce(array_agg(r.integration), '{}') INTO made FROM recorded r;
    -- A statement of its own: it sees a concurrent duplicate's rows, committed meanwhile.
    RETURN QUERY
    SELECT c.integration, c.job_id, c.integration = ANY (made)
    FROM dispatch.call_events c
    WHERE c.call_unique_id = call_event.call_unique_id AND c.event = call_event.event
      AND c.integration = ANY (enabled)
    ORDER BY c.integration;
END $$;

REVOKE ALL ON dispatch.enterprises FROM PUBLIC;
REVOKE ALL ON FUNCTION dispatch.call_event(text, text, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer, dispatch_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dispatch.enterprises TO dispatch_worker;
GRANT SELECT ON dispatch.call_events TO dispatch_worker, dispatch_reader;
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer;


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
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer;
GRANT EXECUTE ON FUNCTION dispatch.call_events(jsonb) TO dispatch_producer;

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

-- An enterprise's integrations config, each CRM's secrets masked.
CREATE FUNCTION dispatch.mask_integrations(config jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_object_agg(i.key, CASE WHEN jsonb_typeof(i.value) = 'object'
                                                  THEN dispatch.mask_settings('crm', i.key, i.value)
                                                  ELSE dispatch.mask_secrets(i.value) END), '{}'::jsonb)
    FROM jsonb_each(CASE WHEN jsonb_typeof(config) = 'object' THEN config ELSE '{}' END) i
$$;

-- A call event that makes several requests (a RetailCRM hangup: the event, then the call into
-- the history) remembers which got through, so a retry does not repeat them.
ALTER TABLE dispatch.call_events ADD COLUMN delivered text[] NOT NULL DEFAULT '{}';
GRANT UPDATE (delivered) ON dispatch.call_events TO dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.mask_secrets(jsonb), dispatch.mask_text(text), dispatch.mask_url_path(text),
    dispatch.mask_settings(text, text, jsonb), dispatch.mask_integrations(jsonb) TO dispatch_reader;

-- The last success and the last error of each enterprise's CRM, kept as outcomes are written:
-- integration_status read them from the whole call history, which took seconds for a CRM that
-- never failed (every event of its history walked to find no error). One statement-level
-- trigger per batch of outcomes; non-CRM batches cost a scan of their transition rows.
CREATE TABLE dispatch.integration_outcomes (
    enterprise      text NOT NULL REFERENCES dispatch.enterprises (number) ON DELETE CASCADE,
    integration     text NOT NULL,
    last_success_at timestamptz,
    last_error_at   timestamptz,
    last_error      text,
    PRIMARY KEY (enterprise, integration)
);
CREATE INDEX call_events_job ON dispatch.call_events (job_id);

CREATE FUNCTION dispatch.note_integration_outcomes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM added a WHERE a.kind = 'crm.event') THEN
        RETURN NULL;
    END IF;
    INSERT INTO dispatch.integration_outcomes AS o (enterprise, integration, last_success_at, last_error_at, last_error)
    SELECT c.enterprise, c.integration,
           max(a.finished_at) FILTER (WHERE a.outcome = 'completed'),
           max(a.finished_at) FILTER (WHERE a.outcome <> 'completed'),
           (array_agg(a.error ORDER BY a.finished_at DESC) FILTER (WHERE a.outcome <> 'completed'))[1]
    FROM added a JOIN dispatch.call_events c ON c.job_id = a.job_id
    WHERE a.kind = 'crm.event'
    GROUP BY c.enterprise, c.integration
    ORDER BY c.enterprise, c.integration  -- one order for every writer: no deadlock between two
    ON CONFLICT (enterprise, integration) DO UPDATE SET
        last_success_at = greatest(o.last_success_at, excluded.last_success_at),
        last_error      = CASE WHEN excluded.last_error_at >= o.last_error_at OR o.last_error_at IS NULL
                               THEN coalesce(excluded.last_error, o.last_error) ELSE o.last_error END,
        last_error_at   = greatest(o.last_error_at, excluded.last_error_at);
    RETURN NULL;
END $$;

CREATE TRIGGER job_history_integration_outcomes AFTER INSERT ON dispatch.job_history
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION dispatch.note_integration_outcomes();

-- What the history of the previous release says (once, at the upgrade).
INSERT INTO dispatch.integration_outcomes (enterprise, integration, last_success_at, last_error_at, last_error)
SELECT c.enterprise, c.integration,
       max(h.finished_at) FILTER (WHERE h.outcome = 'completed'),
       max(h.finished_at) FILTER (WHERE h.outcome <> 'completed'),
       (array_agg(h.error ORDER BY h.finished_at DESC) FILTER (WHERE h.outcome <> 'completed'))[1]
FROM dispatch.job_history h JOIN dispatch.call_events c ON c.job_id = h.job_id
WHERE h.kind = 'crm.event'
GROUP BY c.enterprise, c.integration;

CREATE OR REPLACE VIEW dispatch.integration_status AS
SELECT b.enterprise, b.integration, b.enabled,
       o.last_success_at, o.last_error_at, dispatch.mask_text(o.last_error) AS last_error,
       b.breaker, b.breaker_open_until, b.breaker_reason, b.paused_until
FROM dispatch.crm_breakers b
LEFT JOIN dispatch.integration_outcomes o ON o.enterprise = b.enterprise AND o.integration = b.integration;
GRANT SELECT ON dispatch.integration_outcomes TO dispatch_worker;

-- -- Per-event send flags of a CRM (seed 004: "флаги отправки событий") ----------------------------
-- {"events": {"dial": false}}: that event is not sent to that CRM; an event not named is sent.

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
                    WHEN i.value ? 'events' AND (jsonb_typeof(i.value -> 'events') <> 'object'
                         OR EXISTS (SELECT FROM jsonb_each(i.value -> 'events') v
                                    WHERE v.key NOT IN ('dial', 'bridge', 'hangup', 'download')
                                       OR jsonb_typeof(v.value) <> 'boolean')) THEN
                        format('%s.events must map dial, bridge, hangup, download to true or false', i.key)
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

-- Whether a CRM's config sends this event (enabled, and the event not switched off).
CREATE FUNCTION dispatch.integration_sends(config jsonb, event text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce((config ->> 'enabled')::boolean, false)
       AND coalesce((config -> 'events' ->> event)::boolean, true)
$$;

CREATE OR REPLACE FUNCTION dispatch.call_event_targets(events jsonb)
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
    WHERE dispatch.integration_sends(c.value, e.value ->> 'event')
$$;
