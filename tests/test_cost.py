"""What a job costs the database (issue 23), tested by what the engine does, never by timing:
each test says what it cost before."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import fields
from typing import Any

import psycopg
import pytest

from pgdispatch import sql
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import DONE, Outcome
from pgdispatch.worker.runner import Runner
from tests.helpers import execute, running_worker, scalar, wait_until


def claims(db_url: str) -> int:
    """Calls of claim_jobs_v2 by this database's sessions that have ended (their statistics are
    written when a session ends)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
                           "WHERE schemaname = 'dispatch' AND funcname = 'claim_jobs_v2'").fetchone()
    return int(row[0]) if row else 0


async def test_a_drain_of_one_queue_among_several_claims_once_per_batch(db_url: str) -> None:
    # Before: every round of the claim loop claimed from every queue the worker serves; draining
    # 1,000 jobs of one queue in batches of 100 beside three empty queues (the default set:
    # default, requests, leads, crm) made 4 claims per batch, 3 of them empty round trips that
    # each also looked for jobs to park. Now an empty queue is not claimed again until a NOTIFY
    # names it or a poll interval has passed.
    execute(db_url, "ALTER DATABASE " + str(scalar(db_url, "SELECT current_database()")) + " SET track_functions = 'pl'")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'k' FROM generate_series(1, 1000)")

    async def ok(job: Job) -> Outcome:
        return DONE

    runner = Runner(WorkerConfig(database_url=db_url, drain=True, concurrency=100, max_batch=100,
                                 poll_interval=60), {"k": ok})
    await runner.run()
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 1000
    await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                            "current_database() AND pid <> pg_backend_pid()") == 0, 10)
    # 10 full batches and the drain's last look, plus a look at each empty queue at the start
    # and one at the end: before, at least 30 more.
    made = claims(db_url)
    assert 10 <= made <= 11 + 2 * 3 + 2, made


async def test_a_backlog_in_one_queue_does_not_hold_back_another_queues_jobs(db_url: str) -> None:
    # Before: each round claimed the queues in one order, each taking every free slot; with a
    # backlog in 'bulk' (named before 'default') every round's slots went to it, and a job
    # inserted into 'default' waited for the whole backlog to drain.
    execute(db_url, "INSERT INTO dispatch.queues (name) VALUES ('bulk')")
    execute(db_url, "INSERT INTO dispatch.jobs (queue, kind) SELECT 'bulk', 'k' FROM generate_series(1, 20000)")

    async def ok(job: Job) -> Outcome:
        return DONE

    async with running_worker(db_url, {"k": ok}, concurrency=50, max_batch=50):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history") > 0, 30)
        job = scalar(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('k') RETURNING id")
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE job_id = %s",
                                        (job,)) == 1, 30)
        left = scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE queue = 'bulk'")
    assert left > 0  # it ran while the backlog was still there


def test_a_command_hashes_no_password_until_a_login_needs_it() -> None:
    # Before: the console's auth module hashed a dummy password at import (argon2id, 64 MiB), and
    # every `pgdispatch` command imports it: the worker pool's supervisor peaked at 116 MB RSS
    # (bench --scenario memory), 78 MB after. The dummy hash is made at the first login instead.
    probe = ("import argon2\n"
             "calls = []\n"
             "hash_ = argon2.PasswordHasher.hash\n"
             "argon2.PasswordHasher.hash = lambda self, p, **k: calls.append(p) or hash_(self, p, **k)\n"
             "import pgdispatch.console.main\n"
             "from pgdispatch.dashboard import auth\n"
             "assert not calls, calls\n"
             "assert auth._dummy_hash() == auth._dummy_hash() and len(calls) == 1\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_job_timeouts_take_one_ticker_not_a_timer_per_job(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: every attempt ran inside asyncio.timeout(job_timeout), a timer scheduled and
    # cancelled per job: 12-16% of a no-op job's worker CPU (py-spy over a 200,000-job drain).
    # Now one ticker watches the deadlines of every running job (and still fires: test_worker).
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'k' FROM generate_series(1, 1000)")

    async def ok(job: Job) -> Outcome:
        return DONE

    loop = asyncio.get_running_loop()
    timers = 0
    schedule = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        timers += 1
        return schedule(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    runner = Runner(WorkerConfig(database_url=db_url, drain=True, poll_interval=60), {"k": ok})
    await runner.run()
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 1000
    assert timers < 200, f"{timers} timers scheduled for 1,000 jobs"


def test_the_claim_returns_the_columns_of_job_in_field_order(db_url: str) -> None:
    # The claim builds each Job from its row by position (a dict of keyword arguments per row
    # was ~5% of a no-op job's worker CPU): a column added or moved on one side only must fail here.
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(sql.query("claim_jobs"), {
            "worker_id": "t", "queue": "default", "kinds": ["k"], "version": 0, "max_jobs": 1,
            "lease_seconds": 30})
        assert cur.description is not None
        assert [c.name for c in cur.description] == [f.name for f in fields(Job)]
