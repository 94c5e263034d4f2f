-- Channels and secrets (the second review): one masking of every channel's secrets, vendor limits
-- keyed as the vendors keep them, an OAuth refresh that cannot lose its new token, call events
-- that remember which of their requests got through.

-- Whatever a secret-looking key holds is masked (lists and objects too: "tokens": [...] was
-- shown), and a JWT or a URL's credentials wherever a string holds them (array elements too).
-- db/masking.py says the same in Python.
CREATE OR REPLACE FUNCTION dispatch.mask_secrets(doc jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(doc)
        WHEN 'object' THEN (
            SELECT coalesce(jsonb_object_agg(e.key,
                CASE WHEN e.key ~* '(secret|token|password|passwd|authorization|api[_-]?key|private[_-]?key|signature|credential|cookie)'
                     THEN '"***"'::jsonb
                     ELSE dispatch.mask_secrets(e.value) END), '{}'::jsonb)
            FROM jsonb_each(doc) e)
        WHEN 'array' THEN (
            SELECT coalesce(jsonb_agg(dispatch.mask_secrets(e.value) ORDER BY e.ordinality), '[]'::jsonb)
            FROM jsonb_array_elements(doc) WITH ORDINALITY e)
        WHEN 'string' THEN CASE
            -- A JWT is a bearer credential wherever it sits.
            WHEN doc #>> '{}' ~ '^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$' THEN '"***"'::jsonb
            -- URLs: credentials in userinfo or in secret-looking query parameters.
            WHEN doc #>> '{}' ~* '^[a-z][a-z0-9+.-]*://'
            THEN to_jsonb(regexp_replace(regexp_replace(doc #>> '{}',
                     '^([a-z][a-z0-9+.-]*://)[^/@]*@', '\1***@', 'i'),
                     '([?&][^=&#]*(token|key|secret|password|passwd|sig|auth)[^=&#]*=)[^&#]*', '\1***', 'gi'))
            ELSE doc END
        ELSE doc END
$$;

-- Secrets in free text (errors, excerpts): JWTs, URL userinfo, bearer/basic credentials,
-- secret-looking JSON members and query or form parameters.
CREATE OR REPLACE FUNCTION dispatch.mask_text(doc text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(doc,
        'eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*', '***', 'g'),
        '\m([a-z][a-z0-9+.-]*://)[^/@[:space:]"''<>]*@', '\1***@', 'gi'),
        '\m(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]+', '\1\2***', 'gi'),
        '("[^"]*(secret|token|password|passwd|authorization|api[_-]?key|private[_-]?key|signature|credential|cookie)[^"]*"\s*:\s*)("(\\.|[^"\\])*"|[^,}\s]+)',
        '\1"***"', 'gi'),
        '(\m[A-Za-z0-9_.-]*(secret|token|password|passwd|api[_-]?key|signature|credential|auth)[A-Za-z0-9_.-]*=)[^&\s"''<>]+',
        '\1***', 'gi')
$$;

-- Which settings of each channel are secret (worker/channels/secrets.py says the same):
-- 'value', the whole value; 'url_path', a URL whose path carries the credential (shown as
-- scheme://host/***); 'headers', a map of header names to values (every value).
CREATE TABLE dispatch.secret_settings (
    scope   text NOT NULL CONSTRAINT secret_setting_scope CHECK (scope IN ('credential', 'crm')),
    type    text NOT NULL,
    setting text NOT NULL,
    kind    text NOT NULL CONSTRAINT secret_setting_kind CHECK (kind IN ('value', 'url_path', 'headers')),
    PRIMARY KEY (scope, type, setting)
);
INSERT INTO dispatch.secret_settings (scope, type, setting, kind) VALUES
    ('credential', 'webhooks', 'secret', 'value'), ('credential', 'webhooks', 'url', 'url_path'),
    ('credential', 'webhooks', 'headers', 'headers'),
    ('credential', 'telegram', 'bot_token', 'value'), ('credential', 'telegram', 'base_url', 'url_path'),
    ('credential', 'bitrix24', 'webhook_url', 'url_path'),
    ('credential', 'amocrm', 'client_secret', 'value'), ('credential', 'amocrm', 'refresh_token', 'value'),
    ('credential', 'amocrm', 'access_token', 'value'), ('credential', 'amocrm', 'long_lived_token', 'value'),
    ('credential', 'email', 'password', 'value'),
    ('crm', 'retailcrm', 'api_key', 'value'),
    ('crm', 'webhook', 'secret', 'value'), ('crm', 'webhook', 'url', 'url_path'), ('crm', 'webhook', 'headers', 'headers');

CREATE FUNCTION dispatch.mask_url_path(url text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(substring(url FROM '^([A-Za-z][A-Za-z0-9+.-]*://)(?:[^@/?#]*@)?') ||
                    substring(url FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/?#]+)') || '/***', '***')
$$;

-- A channel's settings as a reader, a log or the CLI may see them: its declared secrets, then
-- the generic masking of everything else.
CREATE FUNCTION dispatch.mask_settings(scope text, type text, settings jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT dispatch.mask_secrets(settings) || coalesce((
        SELECT jsonb_object_agg(s.setting, CASE s.kind
                   WHEN 'value' THEN '"***"'::jsonb
                   WHEN 'url_path' THEN to_jsonb(dispatch.mask_url_path(settings ->> s.setting))
                   ELSE (SELECT coalesce(jsonb_object_agg(h.key, '***'), '{}') FROM jsonb_each(settings -> s.setting) h)
               END)
        FROM dispatch.secret_settings s
        WHERE s.scope = mask_settings.scope AND s.type = mask_settings.type AND settings ? s.setting
          AND CASE s.kind WHEN 'headers' THEN jsonb_typeof(settings -> s.setting) = 'object'
                          WHEN 'url_path' THEN jsonb_typeof(settings -> s.setting) = 'string'
                          ELSE jsonb_typeof(settings -> s.setting) <> 'null' AND settings ->> s.setting <> '' END
    ), '{}'::jsonb)
$$;

-- An enterprise's integrations config, each CRM's secrets masked.
CREATE FUNCTION dispatch.mask_integrations(config jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_object_agg(i.key, CASE WHEN jsonb_typeof(i.value) = 'object'
                                                  THEN dispatch.mask_settings('crm', i.key, i.value)
                                                  ELSE dispatch.mask_secrets(i.value) END), '{}'::jsonb)
    FROM jsonb_each(CASE WHEN jsonb_typeof(config) = 'object' THEN config ELSE '{}' END) i
$$;

CREATE OR REPLACE VIEW dispatch.credentials_masked AS
SELECT c.id, c.type, c.name, c.enabled, dispatch.mask_settings('credential', c.type, c.settings) AS settings,
       c.created_at, c.updated_at,
       (SELECT array_agg(e.external_entity_id ORDER BY e.external_entity_id)
        FROM dispatch.entity_credentials e WHERE e.credential_id = c.id) AS entities,
       (SELECT array_agg(p.external_project_id ORDER BY p.external_project_id)
        FROM dispatch.project_credentials p WHERE p.credential_id = c.id) AS projects
FROM dispatch.credentials c;

-- Errors are free text a remote wrote into (an echoed URL with its key): masked for readers.
CREATE OR REPLACE VIEW dispatch.job_list AS
SELECT j.id, j.queue, j.kind, dispatch.mask_secrets(j.args) AS args, j.priority,
       CASE WHEN j.state = 'running' THEN 'running'
            WHEN j.parked_at IS NOT NULL THEN 'parked'
            WHEN j.run_at > now() THEN 'scheduled' ELSE 'available' END AS state,
       j.run_at, j.expire_at, j.attempt, j.max_attempts, j.tenant, j.version, j.created_at,
       dispatch.mask_text(j.last_error) AS last_error, j.leased_by, j.lease_expires_at, j.parked_at
FROM dispatch.jobs j;

CREATE OR REPLACE VIEW dispatch.dead_job_list AS
SELECT d.job_id, d.queue, d.kind, dispatch.mask_secrets(d.args) AS args, d.tenant, d.attempt,
       d.reason, dispatch.mask_text(d.last_error) AS last_error, d.last_status, d.created_at, d.died_at,
       coalesce(d.max_attempts, q.max_attempts) AS max_attempts, d.expire_at
FROM dispatch.dead_jobs d
LEFT JOIN dispatch.queues q ON q.name = d.queue;

CREATE OR REPLACE VIEW dispatch.recent_failures AS
SELECT h.job_id, h.attempt, h.queue, h.kind, h.tenant, h.outcome, dispatch.mask_text(h.error) AS error, h.status,
       h.worker, h.finished_at
FROM dispatch.job_history h
WHERE h.outcome IN ('retried', 'dead') AND h.finished_at > now() - interval '1 day'
ORDER BY h.finished_at DESC;

-- Process instances and their journals as the read-only role sees them: states, payloads,
-- messages and errors masked (the instances' table itself holds states as the steps wrote them).
CREATE VIEW dispatch.process_list AS
SELECT p.id, p.type, p.version, p.status, p.current_step, dispatch.mask_secrets(p.state) AS state, p.attempts,
       p.retry_after, dispatch.mask_text(p.error) AS error, p.idempotency_key, p.created_at, p.updated_at,
       p.finished_at, p.written_version
FROM dispatch.processes p;

CREATE VIEW dispatch.process_journal AS
SELECT h.id, h.process_id, h.step, h.attempt, h.status, dispatch.mask_text(h.message) AS message,
       dispatch.mask_secrets(h.payload) AS payload, dispatch.mask_text(h.error) AS error, h.version, h.started_at,
       h.finished_at
FROM dispatch.process_history h;

REVOKE SELECT ON dispatch.processes FROM dispatch_reader;
GRANT SELECT ON dispatch.process_list, dispatch.process_journal TO dispatch_reader, dispatch_worker;

-- Vendor limits keyed by what each vendor limits: a Telegram bot (its token, hashed: the key is
-- shown to operators), each chat (about 1/s) and each group or channel (about 20/min), an amoCRM
-- account, a Bitrix24 portal; the other channels by credential. The scopes of a delivery's
-- shared limits (tenant:SCOPE keys), the first also its circuit breaker's.
CREATE FUNCTION dispatch.credential_limit_scopes(id bigint, type text, settings jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE type
        WHEN 'telegram' THEN ARRAY[
            'telegram-bot:' || left(encode(sha256(convert_to(settings ->> 'bot_token', 'UTF8')), 'hex'), 16),
            CASE WHEN settings ->> 'chat_id' ~ '^(-|@)' THEN 'telegram-group:' ELSE 'telegram-chat:' END
                || left(encode(sha256(convert_to(settings ->> 'bot_token', 'UTF8')), 'hex'), 16)
                || ':' || (settings ->> 'chat_id')]
        WHEN 'bitrix24' THEN ARRAY['bitrix24:' || lower(substring(settings ->> 'webhook_url'
                                                                  FROM '^[A-Za-z]+://(?:[^@/?#]*@)?([^/?#:]+)'))]
        WHEN 'amocrm' THEN ARRAY['amocrm:' || lower(substring(settings ->> 'base_url'
                                                              FROM '^[A-Za-z]+://(?:[^@/?#]*@)?([^/?#:]+)'))]
        ELSE ARRAY['credential:' || id]
    END
$$;

-- Each vendor key's rule, made when a credential first names it (kept when operators change it).
CREATE OR REPLACE FUNCTION dispatch.credential_default_limit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO dispatch.limits (key, rate, burst, note)
    SELECT 'tenant:' || s.scope, d.rate, d.burst, d.note
    FROM unnest(dispatch.credential_limit_scopes(NEW.id, NEW.type, NEW.settings)) AS s (scope)
    JOIN (VALUES ('telegram-bot:', 25.0, 5, 'Telegram: about 30 messages/s per bot'),
                 ('telegram-chat:', 1.0, 1, 'Telegram: about one message/s per chat'),
                 ('telegram-group:', 0.33, 1, 'Telegram: about 20 messages/min per group or channel'),
                 ('bitrix24:', 2.0, 45, 'Bitrix24: leaky bucket per portal, blocks at 50, drains 2/s'),
                 ('amocrm:', 6.0, 1, 'amoCRM: at most 7 requests/s per account'))
        AS d (prefix, rate, burst, note) ON s.scope LIKE d.prefix || '%'
    ON CONFLICT (key) DO NOTHING;
    RETURN NULL;
END $$;

DROP TRIGGER credentials_default_limit ON dispatch.credentials;
CREATE TRIGGER credentials_default_limit AFTER INSERT OR UPDATE OF type, settings ON dispatch.credentials
    FOR EACH ROW EXECUTE FUNCTION dispatch.credential_default_limit();

-- The credentials of the previous release: their vendor keys' rules, and the per-credential
-- defaults they replace dropped (an operator's own change to one is kept).
INSERT INTO dispatch.limits (key, rate, burst, note)
SELECT 'tenant:' || s.scope, d.rate, d.burst, d.note
FROM dispatch.credentials c
CROSS JOIN LATERAL unnest(dispatch.credential_limit_scopes(c.id, c.type, c.settings)) AS s (scope)
JOIN (VALUES ('telegram-bot:', 25.0, 5, 'Telegram: about 30 messages/s per bot'),
             ('telegram-chat:', 1.0, 1, 'Telegram: about one message/s per chat'),
             ('telegram-group:', 0.33, 1, 'Telegram: about 20 messages/min per group or channel'),
             ('bitrix24:', 2.0, 45, 'Bitrix24: leaky bucket per portal, blocks at 50, drains 2/s'),
             ('amocrm:', 6.0, 1, 'amoCRM: at most 7 requests/s per account'))
    AS d (prefix, rate, burst, note) ON s.scope LIKE d.prefix || '%'
ON CONFLICT (key) DO NOTHING;
DELETE FROM dispatch.limits l
WHERE l.key LIKE 'tenant:credential:%' AND (l.rate, l.burst, l.note) IN (
    (25.0, 5, 'Telegram: about 30 messages/s per bot'),
    (2.0, 45, 'Bitrix24: leaky bucket per portal, blocks at 50, drains 2/s'),
    (6.0, 1, 'amoCRM: at most 7 requests/s'))
  AND l.concurrency IS NULL AND l.breaker_failures IS NULL AND l.breaker_cooldown IS NULL;

-- amoCRM's OAuth refresh voids the old refresh token the moment it answers: the new pair must
-- be stored in a write that cannot be lost, and no connection held across the HTTP call. A
-- refresh is a lease on the credential (one worker of all refreshes it at a time); the others
-- wait for the token it stores.
ALTER TABLE dispatch.credentials ADD COLUMN refresh_holder text, ADD COLUMN refresh_until timestamptz;

-- Take the refresh lease: the settings when this holder may refresh now, NULL when another
-- holds it (wait, then read the settings again: it has likely stored a new token).
CREATE FUNCTION dispatch.begin_credential_refresh_v1(credential_id bigint, holder text, lease interval)
RETURNS jsonb
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.credentials c SET refresh_holder = holder, refresh_until = now() + lease
    WHERE c.id = credential_id AND (c.refresh_until IS NULL OR c.refresh_until <= now()
                                    OR c.refresh_holder = begin_credential_refresh_v1.holder)
    RETURNING c.settings
$$;

-- Store what the refresh got (`changes` merged into the settings) and give the lease back, in
-- one short transaction of its own; NULL changes: only the lease back.
CREATE FUNCTION dispatch.finish_credential_refresh_v1(credential_id bigint, holder text, changes jsonb)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    UPDATE dispatch.credentials c
    SET settings = CASE WHEN changes IS NULL THEN c.settings ELSE c.settings || changes END,
        refresh_holder = NULL, refresh_until = NULL
    WHERE c.id = credential_id AND c.refresh_holder = finish_credential_refresh_v1.holder
    RETURNING true
$$;

-- A call event that makes several requests (a RetailCRM hangup: the event, then the call into
-- the history) remembers which got through, so a retry does not repeat them.
ALTER TABLE dispatch.call_events ADD COLUMN delivered text[] NOT NULL DEFAULT '{}';

REVOKE ALL ON dispatch.secret_settings FROM PUBLIC;
GRANT SELECT ON dispatch.secret_settings TO dispatch_worker, dispatch_reader;
GRANT UPDATE (delivered) ON dispatch.call_events TO dispatch_worker;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA dispatch FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA dispatch TO dispatch_worker;
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
