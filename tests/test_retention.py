"""Retention and the command scheduler's cost (issue 19, items 8, 9 and 16), against a real
PostgreSQL. Each test says how it failed before its fix."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdispatch.worker.commands import Command, CommandScheduler, register_commands
from pgdispatch.worker.engine import Engine
from tests.helpers import scalar

Conn = psycopg.Connection[tuple[Any, ...]]

OLD = "now() - interval '400 days'"


def plant(conn: Conn) -> None:
    """One old and one recent row in every table a capability registers, and live work that
    must stay however old it is."""
    conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('e1', 'E', '{}')")
    conn.execute("INSERT INTO dispatch.call_events (call_unique_id, event, integration, enterprise, job_id, created_at) "
                 f"VALUES ('old', 'dial', 'webhook', 'e1', -1, {OLD}), ('new', 'dial', 'webhook', 'e1', -2, now()), "
                 f"('live', 'dial', 'webhook', 'e1', (SELECT dispatch.enqueue('k', '{{}}')), {OLD})")
    conn.execute(f"INSERT INTO dispatch.leads (id, created_at) VALUES (1, {OLD}), (2, now()), (3, {OLD})")
    conn.execute(f"INSERT INTO dispatch.lead_batches (lead_id, created_at) VALUES (1, {OLD}), (2, now()), (3, {OLD})")
    conn.execute("INSERT INTO dispatch.deliveries (batch_id, lead_id, type, status) "
                 "SELECT id, lead_id, 'webhooks', CASE WHEN lead_id = 3 THEN 'pending' ELSE 'succeeded' END::dispatch.delivery_status "
                 "FROM dispatch.lead_batches")
    conn.execute("SELECT dispatch.register_process_type_v1('p', 'P', 1, '{s}', 'default')")
    conn.execute("INSERT INTO dispatch.processes (type, version, status, finished_at) VALUES "
                 f"('p', 1, 'done', {OLD}), ('p', 1, 'abandoned', {OLD}), ('p', 1, 'done', now()), ('p', 1, 'retry', NULL)")
    conn.execute("INSERT INTO dispatch.process_history (process_id, step, attempt, status, version) "
                 "SELECT id, 's', 1, 'done', 1 FROM dispatch.processes")
    conn.execute(f"INSERT INTO dispatch.audit_log (at, who, action, target) VALUES ({OLD}, 'a', 'x', 't'), (now(), 'a', 'x', 't')")
    conn.execute("INSERT INTO dispatch.commands (key, name, schedule) VALUES ('c', 'C', '* * * * *')")
    conn.execute(f"INSERT INTO dispatch.command_runs (key, tick, job_id, created_at) VALUES "
                 f"('c', {OLD}, -10, {OLD}), ('c', {OLD} + interval '1 minute', -11, {OLD} + interval '1 minute')")
    conn.execute("INSERT INTO dispatch.limit_state (key, tokens, refilled_at) VALUES "
                 f"('host:gone.example', 1, {OLD}), ('host:here.example', 1, now())")
    conn.execute(f"INSERT INTO dispatch.limit_state (key, tokens, refilled_at, open_until, open_reason) VALUES "
                 f"('host:broken.example', 1, {OLD}, now() + interval '1 minute', 'failing')")
    # The console's: sessions a day past their expiry, failed logins, the charts' minutes.
    conn.execute("INSERT INTO dispatch.console_users (name, role) VALUES ('ann', 'viewer')")
    conn.execute("INSERT INTO dispatch.console_sessions (token_hash, user_name, csrf_token, expires_at) VALUES "
                 f"('\\x01', 'ann', 'c', {OLD}), ('\\x02', 'ann', 'c', now() + interval '1 hour')")
    conn.execute("INSERT INTO dispatch.console_login_failures (user_name, address, at) VALUES "
                 f"('ann', '10.0.0.1', {OLD}), ('ann', '10.0.0.1', now())")
    conn.execute("INSERT INTO dispatch.history_minutes (minute, queue, outcome, shard, jobs) VALUES "
                 f"(date_trunc('minute', {OLD}), 'default', 'completed', 0, 5), "
                 "(date_trunc('minute', now()), 'default', 'completed', 0, 7)")


async def test_maintenance_prunes_every_registered_table_by_its_window_and_keeps_live_work(db_url: str) -> None:
    # Before: nothing pruned call_events, deliveries, lead_batches, process_history, finished
    # processes, audit_log, command_runs or limit_state (one row per host ever reached).
    with psycopg.connect(db_url, autocommit=True) as conn:
        plant(conn)
        assert {r[0] for r in conn.execute("SELECT name FROM dispatch.retention").fetchall()} == {
            "call_events", "lead_batches", "leads", "processes", "audit_log", "command_runs", "limit_state",
            "console_sessions", "console_login_failures", "history_minutes"}
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False, kwargs={"autocommit": True})
    await pool.open()
    try:
        engine = Engine(pool, database_url=db_url, worker_id="w", version=0, lease_seconds=30)
        await engine.maintain(history_keep_seconds=14 * 86400, dead_keep_seconds=30 * 86400)
    finally:
        await pool.close()
    with psycopg.connect(db_url) as conn:
        def ids(query: str) -> list[Any]:
            return [r[0] for r in conn.execute(query).fetchall()]

        assert ids("SELECT call_unique_id FROM dispatch.call_events ORDER BY 1") == ["live", "new"]
        assert ids("SELECT lead_id FROM dispatch.lead_batches ORDER BY 1") == [2, 3]  # 3: still pending
        assert ids("SELECT lead_id FROM dispatch.deliveries ORDER BY 1") == [2, 3]
        assert ids("SELECT id FROM dispatch.leads ORDER BY 1") == [2, 3]
        assert ids("SELECT status::text FROM dispatch.processes ORDER BY id") == ["done", "retry"]
        assert conn.execute("SELECT count(*) FROM dispatch.process_history").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM dispatch.audit_log").fetchone() == (1,)
        assert ids("SELECT job_id FROM dispatch.command_runs") == [-11]  # the command's latest run stays
        assert ids("SELECT key FROM dispatch.limit_state ORDER BY 1") == ["host:broken.example", "host:here.example"]
        assert ids("SELECT token_hash FROM dispatch.console_sessions") == [b"\x02"]
        assert conn.execute("SELECT count(*) FROM dispatch.console_login_failures").fetchone() == (1,)
        assert ids("SELECT jobs FROM dispatch.history_minutes") == [7]
        pruned = dict(conn.execute("SELECT name, pruned FROM dispatch.retention").fetchall())
    assert pruned == {"call_events": 1, "lead_batches": 1, "leads": 1, "processes": 2, "audit_log": 1,
                      "command_runs": 1, "limit_state": 1, "console_sessions": 1, "console_login_failures": 1,
                      "history_minutes": 1}


def test_each_prune_works_in_batches_by_index(conn: Conn) -> None:
    conn.execute("INSERT INTO dispatch.audit_log (at, who, action, target) "
                 "SELECT now() - interval '2 years', 'a', 'x', 't' FROM generate_series(1, 25)")
    batches = []
    while True:
        n = conn.execute("SELECT dispatch.prune_retention_v1('audit_log', 10)").fetchone()[0]  # type: ignore[index]
        batches.append(n)
        if n < 10:
            break
    assert batches == [10, 10, 5]


def touched(conn: Conn, relation: str) -> int:
    """Rows of `relation` this transaction has read so far (its own statistics, exact)."""
    row = conn.execute("SELECT pg_stat_get_xact_tuples_fetched(%s::regclass) + "
                       "pg_stat_get_xact_tuples_returned(%s::regclass)", (relation, relation)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_tick_and_commands_status_cost_the_same_after_a_month_of_runs(db_url: str) -> None:
    # Before: schedule_command_v1 and command_status walked every retained run and probed jobs
    # for each: 66 ms per tick and 158 ms per `commands status` after 30 days of a per-minute
    # command (43,200 runs); a seconds-level cron kept millions.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.commands (key, name, schedule, last_tick) "
                     "VALUES ('every-minute', 'M', '* * * * *', now() - interval '1 minute')")
        conn.execute("INSERT INTO dispatch.command_runs (key, tick, job_id, created_at) "
                     "SELECT 'every-minute', t, -extract(epoch FROM t)::bigint, t FROM generate_series("
                     "now() - interval '30 days', now() - interval '2 minutes', interval '1 minute') t")
        conn.execute("ANALYZE dispatch.command_runs")
    with psycopg.connect(db_url) as conn:  # one transaction: its own counters
        before_runs, before_jobs = touched(conn, "dispatch.command_runs"), touched(conn, "dispatch.jobs")
        job = conn.execute("SELECT dispatch.schedule_command_v2('every-minute', now(), NULL, false)").fetchone()
        assert job is not None and job[0] is not None
        assert touched(conn, "dispatch.command_runs") - before_runs <= 5
        assert touched(conn, "dispatch.jobs") - before_jobs <= 5
        before = touched(conn, "dispatch.command_runs")
        status = conn.execute("SELECT status FROM dispatch.command_status").fetchone()
        assert status == ("Queued",)
        assert touched(conn, "dispatch.command_runs") - before <= 5
        # The previous release's v1 costs the same now.
        before = touched(conn, "dispatch.command_runs")
        conn.execute("SELECT dispatch.schedule_command_v1('every-minute', now() + interval '1 minute', NULL, false)")
        assert touched(conn, "dispatch.command_runs") - before <= 5


async def test_a_scheduler_that_waited_for_its_connection_schedules_the_tick_due_now(db_url: str) -> None:
    # Before: the scheduler read the clock, then waited for a pooled connection (the server
    # restarting); once back, it scheduled the stale tick it had computed, 3.5-6.2 s late, and
    # the tick actually due then found that run still queued and was skipped.
    command = Command("each-second", "S", "* * * * * *", lock=30)
    clock = [datetime(2026, 12, 1, 12, 0, 0, 500_000, tzinfo=UTC)]
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=1, open=False, kwargs={"autocommit": True})
    await pool.open()
    try:
        async with pool.connection() as conn:
            await register_commands(conn, [command], clock[0] - timedelta(seconds=5))
            await conn.execute("UPDATE dispatch.commands SET last_tick = %s", (clock[0] - timedelta(seconds=5),))
        scheduler = CommandScheduler(pool, [command], clock=lambda: clock[0])
        async with pool.connection():  # the only connection is taken: the scheduler waits
            ticking = asyncio.create_task(scheduler.tick())
            await asyncio.sleep(0.2)
            clock[0] += timedelta(seconds=5)  # the outage lasts five seconds
        await asyncio.wait_for(ticking, 10)
    finally:
        await pool.close()
    ticks = [r[0] for r in psycopg.connect(db_url).execute(
        "SELECT tick FROM dispatch.command_runs ORDER BY tick").fetchall()]
    assert ticks == [datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)]
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE kind = 'command:each-second'") == 1
