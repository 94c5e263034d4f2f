"""The engine's statements on a big backlog: does an idle poll or a claim cost more as it grows?

A backlog of N jobs: 80% runnable in queue `default`; in queue `idle`, 10% scheduled a day ahead
and 10% of a kind no worker knows (nothing there is runnable: every poll of it is idle); plus
N/10 retained idempotency keys. Each statement runs under EXPLAIN (ANALYZE, BUFFERS) in a
transaction that is rolled back, so every run sees the same state; the median of `runs` is
reported with the buffers it touched.

The same is measured on the schema as it was before the engine review (alembic revision 0004,
with its _v1 functions and queries), as the system "before review (0004)".
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import psycopg

from pgdispatch import sql
from pgdispatch.bench.scenarios import OURS, Result, fresh_database
from pgdispatch.db.schema import migrate

BEFORE = "before review (0004)"
WORKER = "bench-worker"

# (label, statement before the review, statement now); %(...)s are filled per database.
STATEMENTS: list[tuple[str, str, str]] = [
    ("claim 100 (backlog runnable)",
     "SELECT * FROM dispatch.claim_jobs_v1(%(worker)s, 'default', '{debug.noop}', 0, 100, '30 s')",
     "SELECT * FROM dispatch.claim_jobs_v2(%(worker)s, 'default', '{debug.noop}', 0, 100, '30 s')"),
    ("idle poll (only scheduled and unknown-kind rows)",
     "SELECT * FROM dispatch.claim_jobs_v1(%(worker)s, 'idle', '{debug.noop}', 0, 100, '30 s')",
     "SELECT * FROM dispatch.claim_jobs_v2(%(worker)s, 'idle', '{debug.noop}', 0, 100, '30 s')"),
    ("extend 100 leases",
     "SELECT * FROM dispatch.extend_leases_v1(%(tokens)s, '30 s')",
     "SELECT * FROM dispatch.extend_leases_v1(%(tokens)s, '30 s')"),
    ("newer build waiting?",
     "SELECT EXISTS (SELECT 1 FROM dispatch.jobs WHERE state = 'available' "
     "AND queue = ANY ('{default,idle}') AND run_at <= now() AND version > 0)",
     "SELECT EXISTS (SELECT 1 FROM dispatch.jobs WHERE state <> 'running' AND version > 0 "
     "AND queue = ANY ('{default,idle}'))"),
    ("/health",
     "SELECT queue, paused, available, scheduled, running, dead FROM dispatch.queue_stats",
     "SELECT 1"),
    ("prune expired idempotency keys (now also old dead letters)",
     "DELETE FROM dispatch.idempotency_keys WHERE expires_at <= now()",
     "SELECT dispatch.prune_dead_v1('30 days')"),
]


def poll(server_url: str, *, backlogs: tuple[int, ...] = (10_000, 1_000_000), runs: int = 7) -> list[Result]:
    results: list[Result] = []
    for backlog in backlogs:
        for system, revision, column in ((BEFORE, "0004", 1), (OURS, "head", 2)):
            with fresh_database(server_url, ours=False) as url:
                migrate(url, revision)
                params = _fill(url, backlog, current=revision == "head")
                for statement in STATEMENTS:
                    ms, buffers = _measure(url, statement[column], params, runs)
                    results.append({"scenario": f"{statement[0]}, {backlog:,} jobs", "system": system,
                                    "unit": "ms", "value": ms, "buffers": buffers})
    return results


def _fill(url: str, backlog: int, *, current: bool) -> dict[str, Any]:
    runnable, scheduled, unknown = backlog * 8 // 10, backlog // 10, backlog // 10
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO dispatch.queues (name) VALUES ('idle')")
        c.execute("INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, %s)",
                  (runnable,))
        c.execute("INSERT INTO dispatch.jobs (queue, kind, run_at) "
                  "SELECT 'idle', 'debug.noop', now() + interval '1 day' FROM generate_series(1, %s)",
                  (scheduled,))
        c.execute("INSERT INTO dispatch.jobs (queue, kind) SELECT 'idle', 'x.unknown' "
                  "FROM generate_series(1, %s)", (unknown,))
        c.execute("INSERT INTO dispatch.idempotency_keys (queue, key, job_id, expires_at) "
                  "SELECT 'default', 'k' || i, i, now() + interval '1 hour' FROM generate_series(1, %s) i",
                  (backlog // 10,))
        if current:  # the live worker whose kinds decide what gets parked
            c.execute("INSERT INTO dispatch.workers (id, host, pid, version, queues, slots, kinds) "
                      "VALUES (%s, 'bench', 0, 0, '{*}', 100, '{debug.noop}')", (WORKER,))
        c.execute("VACUUM ANALYZE dispatch.jobs")
        c.execute("VACUUM ANALYZE dispatch.idempotency_keys")
        # 100 running jobs for the lease extension; and, now, the first idle polls for real
        # (they park what nobody runs: later polls are the steady state measured).
        claim = "claim_jobs_v2" if current else "claim_jobs_v1"
        rows = c.execute(f"SELECT id, lease_token FROM dispatch.{claim}(%s, 'default', '{{debug.noop}}', "
                         "0, 100, '1 hour')", (WORKER,)).fetchall()
        idle_poll = f"SELECT * FROM dispatch.{claim}(%s, 'idle', '{{debug.noop}}', 0, 100, '30 s')"
        while True:  # a claim parks at most 10,000 rows: poll until everything is parked
            c.execute(idle_poll, (WORKER,))
            left = c.execute("SELECT count(*) FROM dispatch.jobs "
                             "WHERE queue = 'idle' AND state = 'available'").fetchone()
            if not current or not left or not left[0]:
                break
        c.execute("VACUUM dispatch.jobs")  # as the workers' vacuum duty does after such churn
    return {"worker": WORKER, "tokens": [r[1] for r in rows]}


def _measure(url: str, statement: str, params: dict[str, Any], runs: int) -> tuple[float, int]:
    times, buffers = [], []
    with psycopg.connect(url) as c:
        for _ in range(runs):
            plan = c.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params).fetchone()
            c.rollback()
            assert plan is not None
            top = (plan[0] if isinstance(plan[0], list) else json.loads(plan[0]))[0]
            times.append(top["Execution Time"])
            node = top["Plan"]
            buffers.append(node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0))
    return round(statistics.median(times), 3), int(statistics.median(buffers))


# -- the second review: parks and ticks at scale ------------------------------------------------------

BEFORE_SECOND = "before the second review (0014)"
REVIEW_STATEMENTS: list[tuple[str, str, str]] = [
    ("park one host's waiting requests (1M queued over 1,000 hosts)",
     "SELECT dispatch.park_requests_v1('h7.example', NULL, now() + interval '30 s', now() + interval '60 s', "
     "'0', 'bench')",
     "SELECT dispatch.park_requests_v2('host:h7.example', 'h7.example', NULL, now() + interval '30 s', "
     "now() + interval '60 s', 'bench')"),
    ("a per-minute command's tick (30 days of runs)",
     "SELECT dispatch.schedule_command_v1('every-minute', now(), NULL, false)",
     "SELECT dispatch.schedule_command_v2('every-minute', now(), NULL, false)"),
    ("commands status (30 days of runs)",
     "SELECT * FROM dispatch.command_status",
     "SELECT * FROM dispatch.command_status"),
    ("/stats' integration_status (call events of 10 CRMs, their history)",
     "SELECT * FROM dispatch.integration_status",
     "SELECT * FROM dispatch.integration_status"),
]


READ_TIMEOUT = 60.0  # seconds an operator's read may take in the bench before it is called off


def _time_read(url: str, statement: str, runs: int, setup: str | None) -> tuple[float | None, str | None]:
    """Median wall-clock ms of an operator's read as the console runs it (EXPLAIN ANALYZE's own
    instrumentation made the old integration_status take minutes instead of seconds); None and a
    note when it runs past READ_TIMEOUT."""
    times = []
    with psycopg.connect(url) as c:
        for _ in range(runs):
            c.execute(f"SET LOCAL statement_timeout = '{int(READ_TIMEOUT * 1000)}'")
            if setup:
                c.execute(setup)
            started = time.perf_counter()
            try:
                c.execute(statement).fetchall()
            except psycopg.errors.QueryCanceled:
                c.rollback()
                return None, f"called off after {READ_TIMEOUT:g} s"
            times.append((time.perf_counter() - started) * 1000)
            c.rollback()
    return round(statistics.median(times), 3), None


def review(server_url: str, *, requests: int = 1_000_000, hosts: int = 1000, calls: int = 1_000_000,
           runs: int = 7) -> list[Result]:
    """`--scenario review`: the park of a host's backlog, a command's tick and the operators'
    reads, on the schema before the second review (revision 0014) and now, each statement under
    EXPLAIN ANALYZE in a transaction rolled back, `runs` times (median). Operators' reads run as
    the console runs them: before, with the server's settings; now, after `operator_reads`."""
    results: list[Result] = []
    for system, revision, column in ((BEFORE_SECOND, "0014", 1), (OURS, "head", 2)):
        with fresh_database(server_url, ours=False) as url:
            migrate(url, revision)
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("INSERT INTO dispatch.jobs (queue, kind, args) SELECT 'requests', 'http.request', "
                          "jsonb_build_object('method', 'POST', 'uri', "
                          "'https://h' || (i %% %s) || '.example/x') FROM generate_series(1, %s) i",
                          (hosts, requests))
                c.execute("INSERT INTO dispatch.commands (key, name, schedule, last_tick) "
                          "VALUES ('every-minute', 'M', '* * * * *', now() - interval '1 minute')")
                c.execute("INSERT INTO dispatch.command_runs (key, tick, job_id, created_at) "
                          "SELECT 'every-minute', t, -extract(epoch FROM t)::bigint, t FROM generate_series("
                          "now() - interval '30 days', now() - interval '2 minutes', interval '1 minute') t")
                _call_history(c, calls)
                c.execute("VACUUM ANALYZE dispatch.jobs")
                c.execute("VACUUM ANALYZE dispatch.command_runs")
            setup = sql.query("operator_reads") if column == 2 else None
            for statement in REVIEW_STATEMENTS:
                if statement[0].startswith(("commands status", "/stats")):
                    value, note = _time_read(url, statement[column], 3 if column == 1 else runs, setup)
                    results.append({"scenario": statement[0], "system": system, "unit": "ms",
                                    "value": value if value is not None else READ_TIMEOUT * 1000,
                                    **({"note": note} if note else {})})
                    continue
                ms, buffers = _measure(url, statement[column], {}, runs)
                results.append({"scenario": statement[0], "system": system, "unit": "ms", "value": ms,
                                "buffers": buffers})
    return results


def _call_history(c: psycopg.Connection[Any], calls: int) -> None:
    """`calls` call events spread over 10 enterprises with RetailCRM, each with its job's
    history row (one in ten failed), as a month of telephony leaves them."""
    c.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) "
              "SELECT 'e' || n, 'Enterprise ' || n, jsonb_build_object('retailcrm', jsonb_build_object("
              "'enabled', true, 'api_url', 'https://e' || n || '.retailcrm.example', 'api_key', 'k')) "
              "FROM generate_series(1, 10) n")
    c.execute("INSERT INTO dispatch.call_events "
              "(call_unique_id, event, integration, enterprise, job_id, created_at) "
              "SELECT 'c' || i, 'hangup', 'retailcrm', 'e' || (i %% 10 + 1), -i, "
              "now() - make_interval(secs => (%s - i) * 2.0) FROM generate_series(1, %s) i", (calls, calls))
    c.execute("SELECT dispatch.create_history_partition(d::date) "
              "FROM generate_series(now() - interval '7 days', now(), interval '1 day') d")
    c.execute("INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, outcome, error, finished_at) "
              "SELECT -i, 1, 'crm', 'crm.event', CASE WHEN i %% 10 = 0 THEN 'failed' ELSE 'completed' END, "
              "CASE WHEN i %% 10 = 0 THEN 'HTTP 503' END, "
              "now() - make_interval(secs => (%s - i) * 2.0) + interval '1 s' "
              "FROM generate_series(1, %s) i WHERE i > %s - 7 * 43200", (calls, calls, calls))
    c.execute("VACUUM ANALYZE dispatch.call_events")
    c.execute("ANALYZE dispatch.job_history")
