-- 0013: CRM call events (seed 004): enterprises and their integration config, call events.
-- Kept in step with sql/schema.sql.

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
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
GRANT EXECUTE ON FUNCTION dispatch.call_event(text, text, text, jsonb) TO dispatch_producer;
