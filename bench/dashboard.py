"""The console at scale (`pgdispatch bench --scenario dashboard`): every page's server time
(Server-Timing, p50 and p95 of `requests` loads each) with 1M live jobs, 10M history rows, 1M
dead letters, 1M call events and 100k process instances, the console connected as its own
login role (dispatch_console), logged in as an admin."""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import psycopg
from aiohttp import web
from psycopg import sql as pgsql

from pgdispatch.bench.scenarios import OURS, Result, fresh_database
from pgdispatch.dashboard import DashboardConfig, make_app
from pgdispatch.dashboard.auth import hash_password

PASSWORD = "bench password 1"
SIZES = {"jobs": 1_000_000, "history": 10_000_000, "dead": 1_000_000, "calls": 1_000_000,
         "processes": 100_000}


def dashboard(server_url: str, *, requests: int = 20, sizes: dict[str, int] | None = None) -> list[Result]:
    sizes = {**SIZES, **(sizes or {})}
    with fresh_database(server_url) as url:
        ids = _populate(url, sizes)
        with _console_role(url) as console_url:
            timings = asyncio.run(_measure(console_url, ids, requests))
    results: list[Result] = []
    for page, times in timings.items():
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        for label, value in (("p50", statistics.median(ordered)), ("p95", p95)):
            results.append({"scenario": f"dashboard: {page}, {label}", "system": OURS, "unit": "ms",
                            "value": round(value, 1), "requests": len(ordered),
                            **{f"{k}_rows": v for k, v in sizes.items()}})
    return results


def _populate(url: str, sizes: dict[str, int]) -> dict[str, Any]:
    """The data of a busy week, written in bulk."""
    week = 7 * 86400
    other = sizes["history"] - sizes["calls"]
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO dispatch.queues (name) VALUES ('billing'), ('notify') ON CONFLICT DO NOTHING")
        c.execute("""SELECT dispatch.create_history_partition(d::date)
                     FROM generate_series(now() - interval '7 days', now(), interval '1 day') d""")
        c.execute("""
            INSERT INTO dispatch.jobs (queue, kind, args, tenant, run_at)
            SELECT (ARRAY['default', 'billing', 'notify', 'requests'])[1 + i %% 4], 'kind.' || (i %% 20),
                   jsonb_build_object('order_id', i, 'api_key', 'k'), 'tenant-' || (i %% 50),
                   now() + CASE WHEN i %% 10 = 0 THEN interval '1 hour' ELSE interval '0' END
            FROM generate_series(1, %s) i""", (sizes["jobs"],))
        c.execute("""
            INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, version, attempt, reason,
                                            last_error, created_at, died_at)
            SELECT 2000000000 + i, (ARRAY['default', 'billing', 'notify'])[1 + i %% 3], 'kind.' || (i %% 20),
                   jsonb_build_object('order_id', i), 0, 0, 3,
                   (ARRAY['exhausted', 'stop_code', 'expired'])[1 + i %% 3], 'HTTP 503 from upstream',
                   now() - interval '8 days', now() - make_interval(secs => i * 0.5)
            FROM generate_series(1, %s) i""", (sizes["dead"],))
        c.execute("""
            INSERT INTO dispatch.enterprises (number, name, integrations_config)
            SELECT 'e' || n, 'Enterprise ' || n, jsonb_build_object('retailcrm', jsonb_build_object(
                'enabled', true, 'api_url', 'https://e' || n || '.retailcrm.example', 'api_key', 'k',
                'user_mappings', jsonb_build_object('151', 16)))
            FROM generate_series(1, 100) n""")
        c.execute("""
            INSERT INTO dispatch.call_events
                (call_unique_id, event, integration, enterprise, job_id, created_at)
            SELECT 'c' || i, 'hangup', 'retailcrm', 'e' || (1 + i %% 100), 3000000000 + i,
                   now() - make_interval(secs => %s::float8 * i / %s)
            FROM generate_series(1, %s) i""", (week, sizes["calls"], sizes["calls"]))
        c.execute("""
            INSERT INTO dispatch.job_history
                (job_id, attempt, queue, kind, outcome, error, started_at, finished_at)
            SELECT 3000000000 + i, 1, 'crm', 'crm.event',
                   CASE WHEN i %% 20 = 0 THEN 'retried' ELSE 'completed' END,
                   CASE WHEN i %% 20 = 0 THEN 'HTTP 503' END, t - interval '40 ms', t
            FROM (SELECT i, now() - make_interval(secs => %s::float8 * i / %s) + interval '1 s' AS t
                  FROM generate_series(1, %s) i) x""", (week, sizes["calls"], sizes["calls"]))
        for start in range(0, other, 1_000_000):  # in slices: one statement's sort stays in memory
            c.execute("""
                INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, outcome, error, started_at,
                                                  finished_at)
                SELECT i, 1, (ARRAY['default', 'billing', 'notify', 'requests'])[1 + i %% 4],
                       'kind.' || (i %% 20),
                       CASE WHEN i %% 25 = 0 THEN 'retried' ELSE 'completed' END,
                       CASE WHEN i %% 25 = 0 THEN 'HTTP 500' END, t - interval '5 ms', t
                FROM (SELECT i, now() - make_interval(secs => %s::float8 * i / %s) AS t
                      FROM generate_series(%s, %s) i) x""",
                      (week, other, start + 1, min(start + 1_000_000, other)))
        c.execute("""INSERT INTO dispatch.process_types (type, name, version, steps, queue)
                     VALUES ('checkout', 'CHECKOUT', 1, '{reserve,charge,ship}', 'default')
                     ON CONFLICT DO NOTHING""")
        c.execute("""
            INSERT INTO dispatch.processes
                (type, version, status, current_step, state, attempts, error, finished_at)
            SELECT 'checkout', 1,
                   (ARRAY['done', 'error', 'retry', 'pending'])[1 + i %% 4]::dispatch.process_status,
                   'charge', jsonb_build_object('order', i), 1, CASE WHEN i %% 4 = 1 THEN 'declined' END,
                   CASE WHEN i %% 4 = 0 THEN now() END
            FROM generate_series(1, %s) i""", (sizes["processes"],))
        c.execute("""
            INSERT INTO dispatch.process_history (process_id, step, attempt, status, message, version)
            SELECT p.id, s.step, 1, 'done', 'step ' || s.step, 1
            FROM dispatch.processes p CROSS JOIN unnest(ARRAY['reserve', 'charge', 'ship']) s (step)""")
        c.execute("""
            INSERT INTO dispatch.audit_log (who, action, target, reason)
            SELECT 'ops@host', (ARRAY['retry', 'pause', 'cancel'])[1 + i % 3], 'job:' || i, 'bench'
            FROM generate_series(1, 100000) i""")
        c.execute("""INSERT INTO dispatch.leads (external_entity_id, data)
                     SELECT 1 + i % 100, jsonb_build_object('name', 'Lead ' || i)
                     FROM generate_series(1, 10000) i""")
        c.execute("INSERT INTO dispatch.lead_batches (lead_id) SELECT id FROM dispatch.leads")
        for table in ("jobs", "dead_jobs", "job_history", "call_events", "processes", "process_history",
                      "audit_log", "history_minutes", "lead_batches", "leads"):
            c.execute(pgsql.SQL("VACUUM ANALYZE dispatch.{}").format(pgsql.Identifier(table)))
        job = c.execute("SELECT max(id) FROM dispatch.jobs").fetchone()
        process = c.execute("SELECT max(id) FROM dispatch.processes WHERE status = 'error'").fetchone()
        batch = c.execute("SELECT max(id) FROM dispatch.lead_batches").fetchone()
        dead = c.execute("SELECT max(job_id) FROM dispatch.dead_jobs").fetchone()
        c.execute("SELECT dispatch.add_console_user_v1('bench', 'admin', %s, '{}', '{}', 'bench')",
                  (hash_password(PASSWORD),))
    assert job and process and batch and dead
    return {"job": job[0], "process": process[0], "batch": batch[0], "dead": dead[0]}


@contextlib.contextmanager
def _console_role(url: str) -> Iterator[str]:
    role = f"pgd_bench_console_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD 'bench'").format(pgsql.Identifier(role)))
        c.execute(pgsql.SQL("GRANT dispatch_console TO {}").format(pgsql.Identifier(role)))
    try:
        yield psycopg.conninfo.make_conninfo(url, user=role, password="bench")
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(role)))
            c.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(role)))


def _pages(ids: dict[str, Any]) -> dict[str, str]:
    return {
        "overview": "/overview",
        "jobs": "/jobs",
        "jobs, one queue and state": "/jobs?queue=billing&state=available",
        "jobs, args filter": '/jobs?args={"order_id": 17}',
        "a job": f"/jobs/{ids['job']}",
        "dead letters": "/dead",
        "dead letters, one queue and reason": "/dead?queue=notify&reason=expired",
        "a dead letter": f"/jobs/{ids['dead']}",
        "processes": "/processes",
        "processes in error": "/processes?status=error",
        "a process": f"/processes/{ids['process']}",
        "commands": "/commands",
        "lead batches": "/leads",
        "a batch": f"/leads/batches/{ids['batch']}",
        "credentials": "/credentials",
        "CRM enterprises": "/crm",
        "an enterprise": "/crm/e7",
        "an enterprise's logs": "/crm/e7?tab=logs",
        "an enterprise's errors": "/crm/e7?tab=logs&outcome=error",
        "audit log": "/audit",
    }


async def _measure(console_url: str, ids: dict[str, Any], requests: int) -> dict[str, list[float]]:
    runner = web.AppRunner(make_app(DashboardConfig(database_url=console_url)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    timings: dict[str, list[float]] = {}
    try:
        async with aiohttp.ClientSession(base, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            form = await (await session.get("/login")).text()
            token = re.search(r'name="csrf" value="([^"]+)"', form)
            assert token is not None
            login = {"csrf": token.group(1), "name": "bench", "password": PASSWORD, "next": "/"}
            async with session.post("/login", data=login, allow_redirects=False) as answer:
                assert answer.status == 303, await answer.text()
            for name, path in _pages(ids).items():
                for _ in range(requests + 2):  # two to warm the caches and the pool
                    async with session.get(path, allow_redirects=False) as answer:
                        body = await answer.text()
                        assert answer.status == 200, (path, answer.status, body[body.find("<main>"):][:600])
                        took = float(answer.headers["Server-Timing"].split("dur=")[1])
                    timings.setdefault(name, []).append(took)
                timings[name] = timings[name][2:]
    finally:
        await runner.cleanup()
    return timings
