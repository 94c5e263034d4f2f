-- Every statement the Python code sends. Loaded by name (sql/__init__.py); parameters are
-- always bound, never formatted in.

-- name: claim_jobs
SELECT id, queue, kind, args, priority, attempt, max_attempts, tenant, run_at, expire_at,
       created_at, lease_token, expired
FROM dispatch.claim_jobs_v2(%(worker_id)s, %(queue)s, %(kinds)s, %(version)s, %(max_jobs)s,
                            make_interval(secs => %(lease_seconds)s));

-- name: finish_jobs
-- Binary parameters (the b placeholders): text-format arrays escape every element with a regex, which cost
-- the worker more CPU than the statement costs the server.
SELECT dispatch.finish_jobs_v2(%(ids)b, %(tokens)b, %(outcomes)b, %(delays)b, %(reasons)b,
                               %(errors)b, %(statuses)b, %(details)b::jsonb[]);

-- name: extend_leases
SELECT lost_token FROM dispatch.extend_leases_v2(%(tokens)s,
                                                 make_interval(secs => %(lease_seconds)s));

-- name: rescue_expired
SELECT dispatch.rescue_expired_v3(%(max_jobs)s);

-- name: ensure_history_partitions
SELECT dispatch.ensure_history_partitions();

-- name: history_partitions_older_than
SELECT partition, detach_pending
FROM dispatch.history_partitions_older_than(make_interval(secs => %(keep_seconds)s));

-- name: prune_dead
SELECT dispatch.prune_dead_v1(make_interval(secs => %(keep_seconds)s), %(batch)s);

-- name: take_duty
SELECT dispatch.take_duty_v1(%(duty)s, %(worker_id)s, make_interval(secs => %(lease_seconds)s));

-- name: release_duties
SELECT dispatch.release_duties_v1(%(worker_id)s);

-- name: load_queues
SELECT name, max_attempts, extract(epoch FROM backoff_base)::float8 AS backoff_base,
       backoff_factor, extract(epoch FROM backoff_cap)::float8 AS backoff_cap, backoff_jitter,
       extract(epoch FROM job_timeout)::float8 AS job_timeout, concurrency, paused,
       extract(epoch FROM dedupe_window)::float8 AS dedupe_window
FROM dispatch.queues ORDER BY name;

-- name: unpark_jobs
SELECT dispatch.unpark_jobs_v1(%(kinds)s, %(version)s, %(queues)s);

-- name: register_worker
INSERT INTO dispatch.workers (id, host, pid, version, queues, slots, kinds, lease_seconds)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(queues)s, %(slots)s, %(kinds)s, %(lease_seconds)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL, queues = excluded.queues,
    kinds = excluded.kinds, lease_seconds = excluded.lease_seconds;

-- name: worker_heartbeat
UPDATE dispatch.workers
SET heartbeat_at = now(), running = %(running)s, completed = %(completed)s,
    retried = %(retried)s, dead = %(dead)s, stats = %(stats)s
WHERE id = %(id)s;

-- name: worker_stopped
UPDATE dispatch.workers SET stopped_at = now(), running = 0 WHERE id = %(id)s;

-- name: retention_names
SELECT name FROM dispatch.retention ORDER BY name;

-- name: prune_retention
SELECT dispatch.prune_retention_v1(%(name)s, %(batch)s);

-- name: forget_stopped_workers
DELETE FROM dispatch.workers
WHERE coalesce(stopped_at, heartbeat_at) < now() - interval '1 day';

-- name: newer_build_waiting
SELECT EXISTS (
    SELECT 1 FROM dispatch.jobs
    WHERE state <> 'running' AND version > %(version)s AND queue = ANY (%(queues)s)
);

-- name: queue_stats
SELECT queue, paused, available, scheduled, running, dead, oldest_wait_seconds
FROM dispatch.queue_stats ORDER BY queue;

-- name: worker_status
SELECT id, host, pid, version, queues, kinds, slots, running, completed, retried, dead, started_at,
       heartbeat_at, status, stats
FROM dispatch.worker_status ORDER BY started_at;

-- name: kinds_waiting_unknown
-- Runnable jobs of the given queues whose kind or build this worker cannot run.
SELECT kind, count(*) AS jobs FROM dispatch.jobs
WHERE state <> 'running' AND (run_at <= now() OR parked_at IS NOT NULL) AND queue = ANY (%(queues)s)
  AND (NOT kind = ANY (%(kinds)s) OR version > %(version)s)
GROUP BY kind ORDER BY kind;

-- name: ping
SELECT 1;

-- name: operator_reads
-- Operators' reads (/stats, crm status, the dashboard) are many small index lookups that the
-- planner, costing them as scans, would send through JIT: seconds of compiling for a query that
-- runs in a millisecond. Off for the transaction only (a pooler may give the connection to
-- anyone next).
SET LOCAL jit = off;

-- name: notify_probe
-- A worker checks at start that a NOTIFY sent where it claims reaches its LISTEN connection.
SELECT pg_notify('dispatch_config', %(payload)s);

-- name: queues_without_workers
SELECT q.name AS queue FROM dispatch.queues q
WHERE NOT q.paused
  AND NOT EXISTS (SELECT 1 FROM dispatch.worker_status w
                  WHERE w.status = 'alive' AND ('*' = ANY (w.queues) OR q.name = ANY (w.queues)))
ORDER BY 1;

-- name: alive_workers
SELECT id, pid, host FROM dispatch.worker_status WHERE status = 'alive' ORDER BY id;

-- name: enqueue
SELECT dispatch.enqueue(%(kind)s, %(args)s, queue => %(queue)s, priority => %(priority)s,
                        run_at => %(run_at)s, expire_at => %(expire_at)s,
                        max_attempts => %(max_attempts)s, idempotency_key => %(idempotency_key)s,
                        tenant => %(tenant)s) AS id;

-- name: created_by_this_transaction
-- After dispatch.enqueue in the same transaction: false when the idempotency key was taken and
-- the id is an existing job's (a job this transaction inserted has created_at = now()).
SELECT EXISTS (SELECT 1 FROM dispatch.jobs WHERE id = %(id)s AND created_at = now()) AS created;

-- name: dead_list
SELECT job_id, queue, kind, tenant, attempt, reason, last_error, last_status, died_at
FROM dispatch.dead_job_list
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
ORDER BY died_at DESC, job_id DESC
LIMIT %(limit)s;

-- name: dead_show
SELECT job_id, queue, kind, args, tenant, attempt, max_attempts, reason, last_error, last_status, created_at,
       expire_at, died_at
FROM dispatch.dead_job_list WHERE job_id = %(job_id)s;

-- name: dead_history
SELECT attempt, outcome, error, status, worker, started_at, finished_at
FROM dispatch.job_history WHERE job_id = %(job_id)s ORDER BY finished_at, attempt;

-- name: dead_retry
-- One row per job asked for: revived, or skipped with the reason (audited as one action).
SELECT job_id, revived, reason FROM dispatch.retry_dead_v3(%(job_ids)s, %(expire_at)s, %(who)s, %(reason)s);

-- name: dead_ids
-- The next chunk of dead letters a filter matches, oldest death first, after a cursor
-- (died_at, job_id): bulk actions over "everything the filter matches" go chunk by chunk.
SELECT job_id, died_at FROM dispatch.console_dead_ids_v1(
    %(queue)s, %(kind)s, %(reason)s, make_interval(secs => %(older_than_seconds)s::float8), %(since)s, %(until)s,
    %(after_at)s, %(after_id)s, %(limit)s);

-- name: dead_purge
-- One row per job asked for: purged, or skipped with the reason (audited as one action).
SELECT job_id, purged, reason FROM dispatch.purge_dead_v1(%(job_ids)s, %(who)s, %(reason)s);

-- name: queue_exists
SELECT EXISTS (SELECT 1 FROM dispatch.queues WHERE name = %(name)s);

-- name: queue_set_paused
SELECT dispatch.pause_queue_v1(%(name)s, %(paused)s, %(who)s, %(reason)s);

-- name: queue_create
INSERT INTO dispatch.queues (name) VALUES (%(name)s) ON CONFLICT (name) DO NOTHING;

-- name: queue_update
-- `changes`: the settings to change, seconds for durations, concurrency 0 for no cap.
SELECT dispatch.update_queue_v1(%(name)s, %(changes)s, %(who)s, %(reason)s);

-- name: send_request
SELECT dispatch.send_request(
    %(method)s, %(uri)s, %(body)s,
    CASE WHEN %(expire_in)s::float8 IS NULL THEN NULL
         ELSE now() + make_interval(secs => %(expire_in)s::float8) END,
    %(success_code)s, %(stop_codes)s::int[], %(attempt_limit)s, %(attempt_interval)s,
    %(http_timeout)s, queue => %(queue)s, idempotency_key => %(idempotency_key)s,
    tenant => %(tenant)s, headers => %(headers)s);

-- name: request_show
SELECT id, state, queue, args, attempt, max_attempts, expire_at, created_at, last_error, reason,
       last_status, died_at
FROM (
    SELECT j.id, j.state, j.queue, j.args, j.attempt, j.max_attempts, j.expire_at, j.created_at,
           j.last_error, NULL::text AS reason, NULL::int AS last_status, NULL::timestamptz AS died_at
    FROM dispatch.job_list j WHERE j.id = %(job_id)s AND j.kind = 'http.request'
    UNION ALL
    SELECT d.job_id, 'dead', d.queue, d.args, d.attempt, d.max_attempts, d.expire_at, d.created_at,
           d.last_error, d.reason, d.last_status, d.died_at
    FROM dispatch.dead_job_list d WHERE d.job_id = %(job_id)s AND d.kind = 'http.request'
    UNION ALL
    SELECT h.job_id, 'delivered', h.queue, h.detail -> 'request', h.attempt, NULL, NULL, NULL, NULL,
           NULL, h.status, NULL
    FROM dispatch.job_history h
    WHERE h.job_id = %(job_id)s AND h.kind = 'http.request' AND h.outcome = 'completed'
) found
LIMIT 1;

-- name: request_attempts
SELECT attempt, outcome, status, duration_ms, error_class, error_message, response_body,
       response_headers, started_at, finished_at
FROM dispatch.request_attempts WHERE job_id = %(job_id)s ORDER BY finished_at, attempt;

-- name: jobs_dead_tuples
SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'dispatch.jobs'::regclass;

-- name: vacuum_jobs
VACUUM (SKIP_LOCKED) dispatch.jobs;

-- name: enqueue_many
-- Many jobs in one statement (one round trip; the statement trigger sends one NOTIFY per queue).
-- A row whose idempotency key is taken is skipped by the duplicate-key trigger: RETURNING leaves
-- it out, with its position, so the caller can line ids up with what it asked for.
INSERT INTO dispatch.jobs (kind, args, queue, priority, run_at, expire_at, max_attempts,
                           idempotency_key, tenant)
SELECT u.kind, u.args, coalesce(u.queue, 'default'), coalesce(u.priority, 0), coalesce(u.run_at, now()),
       u.expire_at, u.max_attempts, u.idempotency_key, u.tenant
FROM unnest(%(kinds)s::text[], %(args)s::jsonb[], %(queues)s::text[], %(priorities)s::integer[],
            %(run_ats)s::timestamptz[], %(expire_ats)s::timestamptz[], %(max_attempts)s::integer[],
            %(keys)s::text[], %(tenants)s::text[])
     AS u(kind, args, queue, priority, run_at, expire_at, max_attempts, idempotency_key, tenant)
RETURNING id;

-- name: claim_inline
-- App.drain: the next job of the App's kinds, in claim order, in the caller's transaction.
-- Paused queues and build stamps do not apply: the caller's own code runs it, now.
UPDATE dispatch.jobs j
SET state = 'running', attempt = j.attempt + 1, lease_token = gen_random_uuid(),
    leased_by = %(worker_id)s, leased_at = now(), lease_expires_at = now() + interval '1 hour',
    parked_at = NULL
FROM dispatch.queues q
WHERE j.id = (SELECT s.id FROM dispatch.jobs s
              WHERE s.kind = ANY (%(kinds)s) AND s.state <> 'running'
                AND (%(queues)s::text[] IS NULL OR s.queue = ANY (%(queues)s::text[]))
                AND (s.run_at <= now() OR %(with_scheduled)s)
              ORDER BY s.priority, s.run_at, s.id
              LIMIT 1
              FOR UPDATE SKIP LOCKED)
  AND q.name = j.queue
RETURNING j.id, j.queue, j.kind, j.args, j.priority, j.attempt,
          coalesce(j.max_attempts, q.max_attempts) AS max_attempts, j.tenant, j.run_at, j.expire_at,
          j.created_at, j.lease_token, j.expire_at IS NOT NULL AND j.expire_at <= now() AS expired;

-- Shared limits (worker/outbound/limits.py) ------------------------------------------------------

-- name: load_limits
SELECT key, rate, burst, concurrency, breaker_failures,
       extract(epoch FROM breaker_cooldown)::float8 AS breaker_cooldown
FROM dispatch.limits;

-- name: blocked_limits
SELECT key, greatest(0, extract(epoch FROM paused_until - now()))::float8 AS paused_for, pause_reason,
       greatest(0, extract(epoch FROM open_until - now()))::float8 AS open_for, open_reason
FROM dispatch.limit_state
WHERE paused_until > now() OR open_until IS NOT NULL;

-- name: take_tokens
SELECT granted, ready_in FROM dispatch.take_tokens_v2(%(key)s, %(rate)s, %(burst)s, %(want)s, %(max_wait)s);

-- name: spread_backlog
SELECT parked, greatest(0, extract(epoch FROM first_at - clock_timestamp()))::float8 AS first_in
FROM dispatch.spread_backlog_v1(%(key)s, %(host)s, %(tenant)s, %(rate)s, %(burst)s, %(waiting)s, %(reason)s);

-- name: acquire_slots
SELECT dispatch.acquire_slots_v1(%(key)s, %(holder)s, %(cap)s, %(want)s, %(lease)s);

-- name: release_slots
SELECT dispatch.release_slots_v1(r.key, %(holder)s, r.n) FROM unnest(%(keys)s::text[], %(counts)s::int[]) AS r (key, n);

-- name: renew_slots
SELECT dispatch.renew_slots_v2(%(holder)s, %(keys)s::text[], %(counts)s::int[], %(lease)s);

-- name: release_all_slots
SELECT dispatch.release_all_slots_v1(%(holder)s);

-- name: open_breaker
SELECT dispatch.open_breaker_v1(%(key)s, %(cooldown)s, %(reason)s);

-- name: take_probe
SELECT dispatch.take_probe_v1(%(key)s, %(holder)s, %(lease)s);

-- name: drop_probe
SELECT dispatch.drop_probe_v1(%(key)s, %(holder)s);

-- name: close_breaker
SELECT dispatch.close_breaker_v1(%(key)s);

-- name: pause_limit
SELECT dispatch.pause_limit_v2(%(key)s, now() + %(seconds)s, %(reason)s);

-- name: park_requests
SELECT dispatch.park_requests_v2(%(key)s, %(host)s, %(tenant)s, now() + %(first_in)s, now() + %(others_in)s,
                                 %(reason)s);

-- name: unpark_requests
SELECT dispatch.unpark_requests_v2(%(host)s, %(tenant)s);

-- name: limit_status
SELECT key, rate, burst, concurrency, tokens, in_flight, breaker, paused_until, why
FROM dispatch.limit_status ORDER BY key;

-- name: limit_rules
SELECT key, rate, burst, concurrency, breaker_failures, breaker_cooldown, note, updated_at
FROM dispatch.limits ORDER BY key;

-- name: limit_set
-- limits set: the settings `changes` names replace the rule's (null clears one); the others stay.
SELECT dispatch.set_limit_v1(%(key)s, %(changes)s, %(who)s, %(reason)s) AS created;

-- name: limit_delete
SELECT dispatch.delete_limit_v1(%(key)s, %(who)s, %(reason)s) AS deleted;

-- name: limit_reset
SELECT dispatch.reset_limit_v3(%(key)s, %(who)s, %(reason)s) AS back;

-- Commands (worker/commands.py, console/commands.py) ---------------------------------------------

-- name: register_command
SELECT dispatch.register_command_v1(%(key)s, %(name)s, %(args)s, %(schedule)s, %(queue)s,
                                    %(lock_seconds)s, %(next_tick)s);

-- name: command_ticks
SELECT key, last_tick FROM dispatch.commands WHERE key = ANY (%(keys)s);

-- name: schedule_command
SELECT dispatch.schedule_command_v2(%(key)s, %(tick)s, %(next_tick)s, %(manual)s) AS job_id;

-- name: run_command
SELECT dispatch.run_command_v1(%(key)s, %(who)s) AS job_id;

-- name: command_status
SELECT key, name, args, schedule, queue, status, enabled, holder, since, expires, last_run,
       last_outcome, last_error, next_run
FROM dispatch.command_status ORDER BY key;

-- name: switch_command
WITH allowed AS MATERIALIZED (SELECT dispatch.console_require_operator())
SELECT dispatch.switch_command_v1(%(key)s, %(enable)s, %(who)s, %(reason)s) AS changed FROM allowed;

-- name: unlock_command
WITH allowed AS MATERIALIZED (SELECT dispatch.console_require_operator())
SELECT dispatch.unlock_command_v1(%(key)s, %(who)s, %(reason)s) AS released FROM allowed;

-- name: command_exists
SELECT EXISTS (SELECT 1 FROM dispatch.commands WHERE key = %(key)s) AS exists;

-- Processes (worker/processes.py, console/processes.py) ------------------------------------------

-- name: register_process_type
SELECT dispatch.register_process_type_v1(%(type)s, %(name)s, %(version)s, %(steps)s, %(queue)s);

-- name: take_process_steps
SELECT process_id, run_seq, outcome, step, attempt, state, detail, wait_seconds
FROM dispatch.take_process_steps_v3(%(ids)b::bigint[], %(run_seqs)b::integer[], %(job_ids)b::bigint[],
                                    %(tokens)b::uuid[], %(version)s, %(steps)b::text[], %(at)s);

-- name: finish_process_steps
SELECT process_id, run_seq, status, step, attempt, state
FROM dispatch.finish_process_steps_v3(
    %(ids)b::bigint[], %(run_seqs)b::integer[], %(job_ids)b::bigint[], %(tokens)b::uuid[], %(steps)b::text[],
    %(attempts)b::integer[], %(version)s,
    %(started_ats)b::timestamptz[], %(results)b::text[], %(messages)b::text[], %(payloads)b::jsonb[],
    %(states)b::jsonb[], %(next_steps)b::text[], %(delays)b::double precision[], %(errors)b::text[],
    %(continue_here)b::boolean[], %(at)s);

-- name: start_process
SELECT dispatch.start_process(%(type)s, %(state)s, %(idempotency_key)s) AS id;

-- name: process_list
SELECT id, type, version, status::text AS status, current_step, attempts, retry_after, error,
       created_at, updated_at
FROM dispatch.process_list
WHERE (%(status)s::text IS NULL OR status::text = %(status)s) AND (%(type)s::text IS NULL OR type = %(type)s)
ORDER BY id DESC LIMIT %(limit)s;

-- name: process_get
SELECT id, type, version, status::text AS status, current_step, state, attempts, retry_after, error,
       idempotency_key, created_at, updated_at, finished_at
FROM dispatch.process_list WHERE id = %(id)s;

-- name: process_journal
-- By index, for one instance, never the whole journal.
SELECT step, attempt, status, message, payload, error, version, started_at, finished_at
FROM dispatch.process_journal WHERE process_id = %(id)s ORDER BY id;

-- name: process_restart
WITH allowed AS MATERIALIZED (SELECT dispatch.console_require_operator())
SELECT dispatch.restart_process_v1(%(id)s, %(from_step)s, %(who)s, %(reason)s) FROM allowed;

-- name: process_work
WITH allowed AS MATERIALIZED (SELECT dispatch.console_require_operator())
SELECT dispatch.work_process_v1(%(id)s, %(who)s) FROM allowed;

-- name: process_abandon
WITH allowed AS MATERIALIZED (SELECT dispatch.console_require_operator())
SELECT dispatch.abandon_process_v1(%(id)s, %(who)s, %(reason)s) FROM allowed;

-- name: lead_delivery
SELECT d.id, d.status::text AS status, d.type, d.credential_id, d.lead_id AS delivery_lead_id, c.enabled, c.settings,
       dispatch.credential_limit_scopes(c.id, c.type, c.settings) AS limit_scopes,
       l.id AS lead_id, l.external_entity_id, l.external_project_id, l.data, l.created_at
FROM dispatch.deliveries d
LEFT JOIN dispatch.credentials c ON c.id = d.credential_id
LEFT JOIN dispatch.leads l ON l.id = d.lead_id
WHERE d.id = %(delivery_id)s;

-- name: begin_credential_refresh
-- No row: another worker holds the credential's refresh lease.
SELECT r.settings FROM dispatch.begin_credential_refresh_v1(%(id)s, %(holder)s, %(lease)s) AS r (settings)
WHERE r.settings IS NOT NULL;

-- name: credential_exists
SELECT 1 FROM dispatch.credentials WHERE id = %(id)s;

-- name: finish_credential_refresh
SELECT dispatch.finish_credential_refresh_v1(%(id)s, %(holder)s, %(changes)s);

-- name: send_lead
SELECT dispatch.send_lead(%(lead_id)s, %(types)s, make_interval(secs => %(delay)s)) AS batch_id;

-- name: batch_deliveries
SELECT type, credential_id, status::text AS status, error FROM dispatch.deliveries
WHERE batch_id = %(batch_id)s ORDER BY id;

-- name: resend_leads
SELECT dispatch.resend_leads_v2(%(lead_ids)s, %(types)s, %(who)s) AS summary;

-- name: lead_get
SELECT id, external_entity_id, external_project_id, dispatch.mask_secrets(data) AS data, created_at
FROM dispatch.leads WHERE id = %(id)s;

-- name: lead_batches
SELECT id, requested_types, total, pending, succeeded, failed, skipped, created_at, finished_at
FROM dispatch.batches WHERE lead_id = %(id)s ORDER BY id;

-- name: lead_deliveries
SELECT d.id, d.batch_id, d.credential_id, c.name AS credential, d.type, d.status::text AS status, d.attempts,
       d.error, d.job_id, d.finished_at
FROM dispatch.deliveries d LEFT JOIN dispatch.credentials c ON c.id = d.credential_id
WHERE d.lead_id = %(id)s ORDER BY d.id;

-- name: lead_logs
SELECT at, delivery_id, type, attempt, status, http_status, error, request_excerpt, response_excerpt
FROM dispatch.integration_logs WHERE lead_id = %(id)s ORDER BY at, delivery_id, attempt;

-- name: credential_list
SELECT id, type, name, enabled, settings, entities, projects, updated_at
FROM dispatch.credentials_masked ORDER BY id;

-- name: credential_add
INSERT INTO dispatch.credentials (type, name, settings, enabled)
VALUES (%(type)s, %(name)s, %(settings)s, %(enabled)s) RETURNING id;

-- name: credential_link_entity
INSERT INTO dispatch.entity_credentials (external_entity_id, credential_id) VALUES (%(link)s, %(id)s)
ON CONFLICT DO NOTHING;

-- name: credential_link_project
INSERT INTO dispatch.project_credentials (external_project_id, credential_id) VALUES (%(link)s, %(id)s)
ON CONFLICT DO NOTHING;

-- name: credential_enable
SELECT c.id, c.type, c.name, dispatch.enable_credential_v1(c.id, %(enabled)s, %(who)s, %(reason)s) AS changed
FROM dispatch.credentials c WHERE c.id = %(id)s;

-- name: credential_get
SELECT id, type, name, enabled, settings, dispatch.credential_limit_scopes(id, type, settings) AS limit_scopes
FROM dispatch.credentials WHERE id = %(id)s;

-- name: enterprise_config
-- The integration config cache (notify/integrations.py): one enterprise, secrets included.
SELECT integrations_config FROM dispatch.enterprises WHERE number = %(number)s;

-- name: enterprise_configs
SELECT number, integrations_config FROM dispatch.enterprises;

-- name: crm_breakers
SELECT enterprise, integration, breaker FROM dispatch.crm_breakers ORDER BY enterprise, integration;

-- name: integration_status
SELECT enterprise, integration, enabled, last_success_at, last_error_at, last_error, breaker,
       breaker_open_until, breaker_reason, paused_until
FROM dispatch.integration_status ORDER BY enterprise, integration;

-- name: enterprise_config_masked
SELECT number, name, dispatch.mask_integrations(integrations_config) AS integrations_config, updated_at
FROM dispatch.enterprises WHERE number = %(number)s;

-- name: enterprise_integration_set
-- crm config set: the fields given are merged into the integration's config (null removes one;
-- a new integration starts disabled; a new enterprise is created); the config trigger checks the
-- result. Returns the config with its secrets masked.
SELECT dispatch.set_enterprise_integration_v1(%(number)s, %(integration)s, %(changes)s, %(who)s, %(reason)s,
                                              %(name)s)
    AS integrations_config;

-- name: integration_status_of
SELECT enterprise, integration, enabled, last_success_at, last_error_at, last_error, breaker,
       breaker_open_until, breaker_reason, paused_until
FROM dispatch.integration_status
WHERE %(number)s::text IS NULL OR enterprise = %(number)s
ORDER BY enterprise, integration;

-- name: call_event_delivered
SELECT delivered FROM dispatch.call_events
WHERE call_unique_id = %(call)s AND event = %(event)s AND integration = %(integration)s;

-- name: call_event_mark_delivered
UPDATE dispatch.call_events SET delivered = %(delivered)s::text[]
WHERE call_unique_id = %(call)s AND event = %(event)s AND integration = %(integration)s;

-- name: call_event
SELECT integration, job_id, created
FROM dispatch.call_event(%(number)s, %(event)s, %(call)s, %(payload)s);

-- The operators' console (dashboard/) -----------------------------------------------------------------

-- name: console_begin
-- Every console transaction starts here: who the console user is (the SQL scopes an enterprise
-- admin by it), no JIT for its many small reads, no page waiting long on a lock.
SELECT set_config('pgdispatch.console_user', %(user)s, true), set_config('jit', 'off', true),
       set_config('statement_timeout', '5000', true), set_config('lock_timeout', '2000', true);

-- name: console_session_touch
-- A session's expiry moves on with use, at most once a minute (not a write per page).
UPDATE dispatch.console_sessions s SET last_seen_at = now(), expires_at = now() + %(life)s::interval
WHERE s.token_hash = %(hash)s AND s.expires_at > now() AND s.last_seen_at < now() - interval '1 minute';

-- name: console_session_user
SELECT u.name, u.role, u.enterprises, u.entities, s.csrf_token
FROM dispatch.console_sessions s JOIN dispatch.console_users u ON u.name = s.user_name
WHERE s.token_hash = %(hash)s AND s.expires_at > now() AND NOT u.disabled;

-- name: console_session_start
INSERT INTO dispatch.console_sessions (token_hash, user_name, csrf_token, address, expires_at)
VALUES (%(hash)s, %(name)s, %(csrf)s, %(address)s, now() + %(life)s::interval);

-- name: console_session_end
DELETE FROM dispatch.console_sessions WHERE token_hash = %(hash)s;

-- name: console_account_enabled
SELECT 1 FROM dispatch.console_users WHERE name = %(name)s AND NOT disabled;

-- name: console_login_state
-- Failed logins of this name and this address in the window, and the account's password hash.
SELECT (SELECT count(*) FROM dispatch.console_login_failures f
        WHERE f.user_name = %(name)s AND f.at > now() - %(window)s::interval) AS by_name,
       (SELECT count(*) FROM dispatch.console_login_failures f
        WHERE f.address = %(address)s AND f.at > now() - %(window)s::interval) AS by_address,
       (SELECT u.password_hash FROM dispatch.console_users u WHERE u.name = %(name)s AND NOT u.disabled) AS stored;

-- name: console_login_failed
INSERT INTO dispatch.console_login_failures (user_name, address) VALUES (%(name)s, %(address)s);

-- name: console_login_forget
DELETE FROM dispatch.console_login_failures WHERE user_name = %(name)s;

-- name: console_superuser
SELECT rolsuper FROM pg_roles WHERE rolname = current_user;

-- name: console_overview_queues
SELECT * FROM dispatch.console_queues_v1(%(cap)s);

-- name: console_throughput
SELECT at, completed, failed FROM dispatch.console_throughput_v1(%(span)s, %(bucket)s);

-- name: console_workers
-- Workers alive, lost, or stopped within the hour.
SELECT id, host, pid, version, queues, kinds, slots, running, completed, retried, dead, started_at,
       heartbeat_at, status
FROM dispatch.worker_status
WHERE status <> 'stopped' OR heartbeat_at > now() - interval '1 hour'
ORDER BY status, started_at DESC LIMIT 100;

-- name: console_limits_in_use
-- Open and half-open breakers, paused keys, keys with requests in flight; then the rules.
SELECT key, rate, burst, concurrency, tokens, in_flight, breaker, paused_until, why
FROM dispatch.limit_status
WHERE breaker <> 'closed' OR paused_until IS NOT NULL OR in_flight > 0
ORDER BY breaker DESC, key LIMIT 100;

-- name: console_limit_rules
SELECT key, rate, burst, concurrency, breaker_failures,
       extract(epoch FROM breaker_cooldown)::double precision AS breaker_cooldown, note, updated_at
FROM dispatch.limits ORDER BY key LIMIT 500;

-- name: console_jobs
-- A page of live jobs, newest first (dispatch.console_jobs_v1: bounded; a row with a NULL id
-- carries how far it looked when nothing matched).
SELECT * FROM dispatch.console_jobs_v1(%(queue)s, %(kind)s, %(tenant)s, %(state)s, %(args)s, %(before)s,
                                       %(scan)s, %(page)s);

-- name: console_job_by_key
SELECT id FROM dispatch.console_job_by_key_v1(%(key)s) id;

-- name: console_job
SELECT * FROM dispatch.console_job_v1(%(id)s);

-- name: console_dead_job
SELECT * FROM dispatch.console_dead_job_v1(%(id)s);

-- name: console_job_attempts
SELECT attempt, outcome, error, status, worker, started_at, finished_at, seconds
FROM dispatch.job_attempts WHERE job_id = %(id)s ORDER BY finished_at, attempt LIMIT 500;

-- name: console_dead
SELECT * FROM dispatch.console_dead_v1(%(queue)s, %(kind)s, %(reason)s, %(since)s, %(until)s, %(before_at)s,
                                       %(before_id)s, %(scan)s, %(page)s);

-- name: console_processes
SELECT * FROM dispatch.console_processes_v1(%(type)s, %(status)s, %(before)s, %(scan)s, %(page)s);

-- name: console_process_types
SELECT type, version, steps, queue FROM dispatch.process_types ORDER BY type;

-- name: console_process
SELECT l.*, l.status::text AS status_text, t.steps, t.version AS registered_version
FROM dispatch.process_list l JOIN dispatch.process_types t ON t.type = l.type WHERE l.id = %(id)s;

-- name: console_process_journal
SELECT id, step, attempt, status::text AS status, message, payload, error, version, started_at, finished_at
FROM dispatch.process_journal WHERE process_id = %(id)s ORDER BY id LIMIT 1000;

-- name: console_batches
-- Lead batches, newest first, with their counters (dispatch.batches' own, counted for the page's
-- batches only, by index); an enterprise admin's entities only. At most %(scan)s batches read
-- below the cursor (by the primary key); a row with a NULL id carries how far it looked.
WITH scanned AS MATERIALIZED (
    SELECT b.id, b.lead_id FROM dispatch.lead_batches b
    WHERE %(before)s::bigint IS NULL OR b.id < %(before)s
    ORDER BY b.id DESC LIMIT %(scan)s
), page AS (
    SELECT s.id FROM scanned s JOIN dispatch.leads l ON l.id = s.lead_id
    WHERE (%(lead)s::bigint IS NULL OR s.lead_id = %(lead)s)  -- the scope once (an InitPlan), not per row
      AND ((SELECT dispatch.console_entity_scope()) IS NULL
           OR l.external_entity_id = ANY (coalesce((SELECT dispatch.console_entity_scope()), '{}')))
    ORDER BY s.id DESC LIMIT %(page)s
), counted AS (
    SELECT b.id, b.lead_id, b.requested_types, b.created_at,
           count(d.id) FILTER (WHERE d.status <> 'skipped')::integer AS total,
           count(d.id) FILTER (WHERE d.status = 'pending')::integer AS pending,
           count(d.id) FILTER (WHERE d.status = 'succeeded')::integer AS succeeded,
           count(d.id) FILTER (WHERE d.status = 'failed')::integer AS failed,
           count(d.id) FILTER (WHERE d.status = 'skipped')::integer AS skipped,
           CASE WHEN count(d.id) FILTER (WHERE d.status = 'pending') = 0
                THEN coalesce(max(d.finished_at), b.created_at) END AS finished_at
    FROM page p JOIN dispatch.lead_batches b ON b.id = p.id
    LEFT JOIN dispatch.deliveries d ON d.batch_id = b.id
    GROUP BY b.id
)
SELECT c.*, f.scanned, f.lowest
FROM (SELECT count(*) AS scanned, min(s.id) AS lowest FROM scanned s) f
LEFT JOIN counted c ON true
ORDER BY c.id DESC NULLS LAST;

-- name: console_batch
SELECT b.id, b.lead_id, b.requested_types, b.created_at,
       count(d.id) FILTER (WHERE d.status <> 'skipped')::integer AS total,
           count(d.id) FILTER (WHERE d.status = 'pending')::integer AS pending,
           count(d.id) FILTER (WHERE d.status = 'succeeded')::integer AS succeeded,
           count(d.id) FILTER (WHERE d.status = 'failed')::integer AS failed,
           count(d.id) FILTER (WHERE d.status = 'skipped')::integer AS skipped,
           CASE WHEN count(d.id) FILTER (WHERE d.status = 'pending') = 0
                THEN coalesce(max(d.finished_at), b.created_at) END AS finished_at,
       l.external_entity_id, l.external_project_id, dispatch.mask_secrets(l.data) AS data
FROM dispatch.lead_batches b JOIN dispatch.leads l ON l.id = b.lead_id
LEFT JOIN dispatch.deliveries d ON d.batch_id = b.id
WHERE b.id = %(id)s AND dispatch.console_sees_entity(l.external_entity_id)
GROUP BY b.id, l.id;

-- name: console_batch_deliveries
SELECT d.id, d.credential_id, d.type, d.status::text AS status, dispatch.mask_text(d.error) AS error, d.job_id,
       c.name AS credential
FROM dispatch.deliveries d LEFT JOIN dispatch.credentials_masked c ON c.id = d.credential_id
WHERE d.batch_id = %(id)s ORDER BY d.id;

-- name: console_batch_log
SELECT at, delivery_id, type, attempt, status, http_status, error, request_excerpt, response_excerpt
FROM dispatch.integration_logs WHERE batch_id = %(id)s ORDER BY at LIMIT 500;

-- name: console_credentials
SELECT id, type, name, enabled, settings, entities, projects, created_at, updated_at
FROM dispatch.credentials_masked c WHERE dispatch.console_sees_credential(c.id) ORDER BY id LIMIT 500;

-- name: console_enterprises
SELECT * FROM dispatch.console_enterprises_v1(%(after)s, %(page)s);

-- name: console_enterprise
SELECT * FROM dispatch.console_enterprise_v1(%(number)s);

-- name: console_enterprise_status
SELECT integration, enabled, last_success_at, last_error_at, last_error, breaker, breaker_open_until,
       breaker_reason, paused_until
FROM dispatch.integration_status WHERE enterprise = %(number)s AND dispatch.console_sees_enterprise(%(number)s)
ORDER BY integration;

-- name: console_crm_logs
SELECT * FROM dispatch.console_crm_logs_v1(%(number)s, %(before)s, %(outcome)s, %(scan)s, %(page)s);

-- name: console_test_credential
SELECT dispatch.test_credential_v1(%(id)s, %(who)s) AS job_id;

-- name: console_test_integration
SELECT dispatch.test_integration_v1(%(number)s, %(integration)s, %(who)s) AS job_id;

-- name: console_test_result
SELECT * FROM dispatch.console_test_result_v1(%(job)s, %(queue)s, %(who)s);

-- name: console_audit
-- The audit log, newest first: at most %(scan)s entries read below the cursor (at, id), the
-- filters applied to those.
WITH scanned AS MATERIALIZED (
    SELECT a.id, a.at, a.who, a.action, a.target FROM dispatch.audit_log a
    WHERE %(before_at)s::timestamptz IS NULL OR (a.at, a.id) < (%(before_at)s, %(before_id)s::bigint)
    ORDER BY a.at DESC, a.id DESC LIMIT %(scan)s
), page AS (
    SELECT s.id, s.at FROM scanned s
    WHERE (%(who)s::text IS NULL OR s.who = %(who)s)
      AND (%(action)s::text IS NULL OR s.action = %(action)s)
      AND (%(target)s::text IS NULL OR starts_with(s.target, %(target)s))
    ORDER BY s.at DESC, s.id DESC LIMIT %(page)s
)
SELECT a.id, a.at, a.who, a.action, a.target, a.reason, a.detail, f.scanned, f.lowest_at, f.lowest_id
FROM (SELECT count(*) AS scanned, min(s.at) AS lowest_at, (array_agg(s.id ORDER BY s.at, s.id))[1] AS lowest_id
      FROM scanned s) f
LEFT JOIN (page p JOIN dispatch.audit_log a ON a.id = p.id) ON true
ORDER BY p.at DESC NULLS LAST, p.id DESC;

-- name: console_users
SELECT name, role, enterprises, entities, disabled, has_password, created_at, password_changed_at, last_seen_at
FROM dispatch.console_user_list ORDER BY name;

-- name: console_user_add
SELECT dispatch.add_console_user_v1(%(name)s, %(role)s, %(password_hash)s, %(enterprises)s, %(entities)s, %(who)s);

-- name: console_user_set_disabled
SELECT dispatch.disable_console_user_v1(%(name)s, %(disabled)s, %(who)s);

-- name: console_user_password
SELECT dispatch.set_console_password_v1(%(name)s, %(password_hash)s, %(who)s);

-- name: console_user_delete
SELECT dispatch.delete_console_user_v1(%(name)s, %(who)s);

-- name: console_cancel_jobs
SELECT job_id, cancelled AS done, detail FROM dispatch.cancel_jobs_v1(%(ids)s, %(reason)s, %(who)s);

-- name: console_run_jobs_now
SELECT job_id, moved AS done, detail FROM dispatch.run_jobs_now_v1(%(ids)s, %(who)s);

-- name: console_job_ids
-- The ids of the live jobs a filter matches, newest first, below a cursor: a bulk action's chunk.
SELECT id FROM dispatch.console_job_ids_v1(%(queue)s, %(kind)s, %(tenant)s, %(state)s, %(args)s, %(before)s,
                                          %(limit)s) id;

-- name: console_crm_reset
SELECT dispatch.reset_integration_v1(%(number)s, %(integration)s, %(who)s) AS back;
