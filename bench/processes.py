"""The processes scenario (`pgdispatch bench --scenario processes`): 10,000 instances of a
five-step no-op process (50,000 steps) against the no-op drain rate in the same run, and the
cost of resuming one instance beside a journal of 10 million rows."""

from __future__ import annotations

import asyncio
import time

import psycopg

from pgdispatch.bench.process_app import app as noop_app
from pgdispatch.bench.scenarios import (
    OUR_DRAIN,
    OURS,
    Result,
    _our_drain_rate,
    _our_worker,
    _queue_noops,
    fresh_database,
)

APP = ("--app", "pgdispatch.bench.process_app:app")


def processes(server_url: str, *, instances: int = 10_000, journal_rows: int = 10_000_000) -> list[Result]:
    with fresh_database(server_url) as url:
        _queue_noops(url, instances * 5)
        jobs, drain_rate = _our_drain_rate(url, *OUR_DRAIN)
    with fresh_database(server_url) as url:
        asyncio.run(_register(url))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT count(dispatch.start_process('bench_noop')) FROM generate_series(1, %s)",
                         (instances,))
            conn.execute("VACUUM ANALYZE dispatch.jobs")
        if _our_worker(url, "--drain", *OUR_DRAIN, *APP).wait() != 0:
            raise RuntimeError("pgdispatch worker failed")
        with psycopg.connect(url) as conn:
            row = conn.execute("""SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at))
                                  FROM dispatch.process_history WHERE status = 'done'""").fetchone()
            done = conn.execute("SELECT count(*) FROM dispatch.processes WHERE status = 'done'").fetchone()
        assert row is not None and done is not None
        steps, seconds = int(row[0]), float(row[1])
        small = _resume_one(url)
        _grow_journal(url, journal_rows)
        large = _resume_one(url)
    return [
        {"scenario": "processes: no-op drain, same run", "system": OURS, "unit": "jobs/s",
         "value": round(drain_rate), "jobs": jobs},
        {"scenario": "processes: 5-step no-op", "system": OURS, "unit": "steps/s",
         "value": round(steps / seconds), "steps": steps, "instances_done": int(done[0]),
         "share_of_drain": round(steps / seconds / drain_rate, 2)},
        {"scenario": "processes: resume one instance, journal 10M rows", "system": OURS, "unit": "ms",
         "value": large["total_ms"], "journal_rows": journal_rows, "before": small, "after": large},
    ]


async def _register(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await noop_app.register(conn)


def _resume_one(url: str) -> dict[str, float]:
    """One instance through its five steps by an inline drain, and the journal read for it."""
    async def run() -> tuple[float, float]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            pid = await noop_app.start_process(conn, "bench_noop")
            started = time.perf_counter()
            await noop_app.drain(conn)
            elapsed = time.perf_counter() - started
            plan = await (await conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) SELECT step, attempt, status, message, payload, error, "
                "version, started_at, finished_at FROM dispatch.process_history WHERE process_id = %s "
                "ORDER BY id",
                (pid,))).fetchone()
            assert plan is not None
            return elapsed, float(plan[0][0]["Execution Time"])

    total, journal_ms = asyncio.run(run())
    return {"total_ms": round(total * 1000, 1), "journal_read_ms": round(journal_ms, 3)}


def _grow_journal(url: str, rows: int) -> None:
    """Other instances' history: 1,000 finished instances with rows/1000 journal rows each."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO dispatch.processes (type, version, status, finished_at)
                        SELECT 'bench_noop', 1, 'done', now() FROM generate_series(1, 1000)""")
        conn.execute("""INSERT INTO dispatch.process_history (process_id, step, attempt, status, version)
                        SELECT p.id, 'one', g, 'done', 1
                        FROM (SELECT id FROM dispatch.processes ORDER BY id DESC LIMIT 1000) p,
                             generate_series(1, %s) g""", (rows // 1000,))
        conn.execute("VACUUM ANALYZE dispatch.process_history")
