"""The engine end to end: a real Runner against a real database."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import psycopg
import pytest

from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors.debug import EXECUTORS as DEBUG
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import DONE, Discard, InvalidJob, Outcome, Retry
from pgdispatch.worker.runner import EXIT_NEWER_BUILD, Runner
from tests.helpers import execute, running_worker, scalar, wait_until


async def test_drain_runs_everything_runnable_and_accounts_for_every_job(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 300)")
    execute(db_url, "SELECT dispatch.enqueue('debug.fail', max_attempts => 1)")
    execute(db_url, "SELECT dispatch.enqueue('debug.sleep', '{\"seconds\": \"soon\"}')")
    execute(db_url, "SELECT dispatch.enqueue('debug.noop', run_at => now() + interval '1 hour')")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True, concurrency=50, max_batch=20),
                    DEBUG)
    assert await asyncio.wait_for(runner.run(), 30) == 0
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1  # only the scheduled one
    dead = dict(psycopg.connect(db_url).execute("SELECT kind, reason FROM dispatch.dead_jobs").fetchall())
    assert dead == {"debug.fail": "exhausted", "debug.sleep": "invalid"}
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 300
    assert runner.counters.completed == 300


async def test_notify_wakes_an_idle_worker_long_before_the_poll(db_url: str) -> None:
    done = asyncio.Event()

    async def mark(job: Job) -> Outcome:
        done.set()
        return DONE

    async with running_worker(db_url, {"t.mark": mark}, poll_interval=60) as runner:
        await wait_until(lambda: runner.listener.connected.is_set())  # idle, LISTENing; next poll in 60 s
        started = time.monotonic()
        execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.mark')")
        await asyncio.wait_for(done.wait(), 5)
        assert time.monotonic() - started < 1.0


async def test_listener_reconnects_and_notify_works_again(db_url: str) -> None:
    seen = asyncio.Event()

    async def mark(job: Job) -> Outcome:
        seen.set()
        return DONE

    async with running_worker(db_url, {"t.mark": mark}, poll_interval=60) as runner:
        # Exactly this worker's LISTEN connection: nothing of other databases or tests.
        assert runner.listener.backend_pid is not None
        assert scalar(db_url, "SELECT pg_terminate_backend(%s)", (runner.listener.backend_pid,)) is True
        await wait_until(lambda: runner.listener.reconnects >= 1, timeout=10)
        execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.mark')")
        await asyncio.wait_for(seen.wait(), 5)


async def test_two_workers_never_run_the_same_job(db_url: str) -> None:
    runs: Counter[int] = Counter()
    concurrent: set[int] = set()
    overlaps = 0

    async def track(job: Job) -> Outcome:
        nonlocal overlaps
        if job.id in concurrent:
            overlaps += 1
        concurrent.add(job.id)
        runs[job.id] += 1
        await asyncio.sleep(0.001)
        concurrent.discard(job.id)
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 't.track' FROM generate_series(1, 1000)")
    cfg = {"drain": True, "concurrency": 20, "max_batch": 10}
    a = Runner(WorkerConfig(database_url=db_url, **cfg), {"t.track": track})
    b = Runner(WorkerConfig(database_url=db_url, **cfg), {"t.track": track})
    await asyncio.wait_for(asyncio.gather(a.run(), b.run()), 60)
    assert len(runs) == 1000 and set(runs.values()) == {1} and overlaps == 0
    assert a.counters.completed > 0 and b.counters.completed > 0


async def test_long_job_keeps_its_lease_by_heartbeat(db_url: str) -> None:
    async def slow(job: Job) -> Outcome:
        await asyncio.sleep(4)  # twice the lease: only heartbeats keep it
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.slow')")
    async with running_worker(db_url, {"t.slow": slow}, lease_seconds=2, rescue_interval=0.1):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history") == 1, 10)
    assert psycopg.connect(db_url).execute("SELECT attempt, outcome FROM dispatch.job_history").fetchall() == [(1, "completed")]


async def test_worker_that_lost_its_lease_abandons_the_job(db_url: str) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(job: Job) -> Outcome:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.hang')")
    async with running_worker(db_url, {"t.hang": hang}, lease_seconds=3, rescue_interval=60):
        await asyncio.wait_for(started.wait(), 5)
        # Another worker's rescue takes the job over (as if we had stalled past the lease).
        execute(db_url, "UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 second'")
        execute(db_url, "SELECT dispatch.rescue_expired_v2()")
        execute(db_url, "UPDATE dispatch.queues SET paused = true")  # nobody re-claims it
        await asyncio.wait_for(cancelled.wait(), 5)
    rows = psycopg.connect(db_url).execute("SELECT attempt, outcome FROM dispatch.job_history").fetchall()
    assert rows == [(1, "rescued")]
    # Rescued attempts back off like retries.
    assert psycopg.connect(db_url).execute("SELECT state::text, attempt, run_at >= (SELECT finished_at FROM dispatch.job_history) + interval '0.9 seconds' FROM dispatch.jobs").fetchall() == [("scheduled", 1, True)]


async def test_executor_outcomes_and_failures(db_url: str) -> None:
    async def boom(job: Job) -> Outcome:
        raise RuntimeError("remote exploded")

    async def invalid(job: Job) -> Outcome:
        raise InvalidJob("args.to is missing")

    async def later(job: Job) -> Outcome:
        return Retry(after=120, error="429 Too Many Requests", status=429)

    async def stop(job: Job) -> Outcome:
        return Discard("stop_code", "remote said 418", status=418)

    async def wrong(job: Job) -> Outcome:
        return "ok"  # type: ignore[return-value]

    async def slow(job: Job) -> Outcome:
        await asyncio.sleep(30)
        return DONE

    executors = {"t.boom": boom, "t.invalid": invalid, "t.later": later, "t.stop": stop,
                 "t.wrong": wrong, "t.slow": slow}
    execute(db_url, "UPDATE dispatch.queues SET job_timeout = '0.3 seconds', backoff_base = '10 seconds', backoff_cap = '10 seconds', backoff_jitter = 0")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT unnest(%s::text[])", (list(executors),))
    runner = Runner(WorkerConfig(database_url=db_url, drain=True), executors)
    assert await asyncio.wait_for(runner.run(), 30) == 0
    with psycopg.connect(db_url) as c:
        live = {k: (e, d) for k, e, d in c.execute(
            "SELECT kind, last_error, round(extract(epoch FROM run_at - now())) FROM dispatch.jobs").fetchall()}
        dead = {k: (r, s) for k, r, s in c.execute("SELECT kind, reason, last_status FROM dispatch.dead_jobs").fetchall()}
    assert live["t.boom"][0] == "RuntimeError: remote exploded"
    assert 8 <= live["t.boom"][1] <= 10  # the queue's backoff
    assert 118 <= live["t.later"][1] <= 120 and live["t.later"][0] == "429 Too Many Requests"
    assert "not an Outcome" in live["t.wrong"][0]
    assert "timed out after 0.3s" in live["t.slow"][0]
    assert dead == {"t.invalid": ("invalid", None), "t.stop": ("stop_code", 418)}


async def test_expired_job_is_dead_without_running(db_url: str) -> None:
    ran = False

    async def never(job: Job) -> Outcome:
        nonlocal ran
        ran = True
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind, created_at, expire_at) VALUES ('t.never', now() - interval '1 hour', now() - interval '1 minute')")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True), {"t.never": never})
    await asyncio.wait_for(runner.run(), 30)
    assert not ran
    assert scalar(db_url, "SELECT reason FROM dispatch.dead_jobs") == "expired"


async def test_version_guard_leaves_newer_jobs_and_unknown_kinds(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, version) VALUES ('debug.noop', 5), ('debug.noop', 3), ('no.such.kind', 0)")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True, version=3), DEBUG)
    assert await asyncio.wait_for(runner.run(), 30) == 0
    left = psycopg.connect(db_url).execute("SELECT kind, version, state::text, attempt FROM dispatch.jobs ORDER BY id").fetchall()
    # Left untouched (no attempt spent), and parked: idle polls no longer walk them.
    assert left == [("debug.noop", 5, "scheduled", 0), ("no.such.kind", 0, "scheduled", 0)]


async def test_exit_on_newer_build(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, version) VALUES ('debug.noop', 9)")
    runner = Runner(WorkerConfig(database_url=db_url, version=3, exit_on_newer=True, lease_seconds=1),
                    DEBUG)
    assert await asyncio.wait_for(runner.run(), 30) == EXIT_NEWER_BUILD


async def test_queue_policy_changes_reach_a_running_worker(db_url: str) -> None:
    async with running_worker(db_url, DEBUG, poll_interval=0.2) as runner:
        execute(db_url, "UPDATE dispatch.queues SET paused = true")
        await wait_until(lambda: runner.policies.get("default").paused, 5)  # type: ignore[union-attr]
        execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop')")
        await asyncio.sleep(0.6)
        assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1
        execute(db_url, "UPDATE dispatch.queues SET paused = false, max_attempts = 3")
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 5)
        assert runner.policies.get("default").max_attempts == 3  # type: ignore[union-attr]


async def test_per_queue_concurrency_cap(db_url: str) -> None:
    peak = 0
    now = 0

    async def measure(job: Job) -> Outcome:
        nonlocal peak, now
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.02)
        now -= 1
        return DONE

    execute(db_url, "UPDATE dispatch.queues SET concurrency = 3")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 't.m' FROM generate_series(1, 30)")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True, concurrency=50), {"t.m": measure})
    await asyncio.wait_for(runner.run(), 30)
    assert peak == 3 and runner.counters.completed == 30


async def test_stop_releases_jobs_still_running_after_the_grace_period(db_url: str) -> None:
    async def hang(job: Job) -> Outcome:
        await asyncio.sleep(60)
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 't.hang' FROM generate_series(1, 5)")
    async with running_worker(db_url, {"t.hang": hang}, grace_seconds=0.2):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 5)
    rows = psycopg.connect(db_url).execute("SELECT state::text, attempt FROM dispatch.jobs").fetchall()
    assert rows == [("available", 0)] * 5


async def test_a_worker_survives_poisoned_jobs(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('debug.sleep', '{\"seconds\": -1}'), ('debug.sleep', '{\"seconds\": [1]}'), ('debug.sleep', '{\"seconds\": true}'), ('debug.noop', '{}')")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True), DEBUG)
    assert await asyncio.wait_for(runner.run(), 30) == 0
    assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs WHERE reason = 'invalid'") == 3
    assert runner.counters.completed == 1


def test_worker_config_refuses_nonsense() -> None:
    from pgdispatch.db.errors import ConfigurationError

    for bad in ({"concurrency": 0}, {"lease_seconds": 0.1}, {"fetch_cooldown": -1}, {"poll_interval": 0}):
        with pytest.raises(ConfigurationError):
            WorkerConfig(database_url="postgresql://x", **bad)  # type: ignore[arg-type]


async def test_workers_vacuum_the_jobs_table_when_dead_rows_pile_up(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 3000)")

    def vacuumed() -> bool:
        return bool(scalar(db_url, "SELECT vacuum_count > 0 FROM pg_stat_user_tables "
                                   "WHERE relid = 'dispatch.jobs'::regclass"))

    assert not vacuumed()
    async with running_worker(db_url, DEBUG, vacuum_interval=0.2, vacuum_min_dead_tuples=1000):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 20)
        await wait_until(vacuumed, 30, every=0.2)  # stats reach the server within ~10 s


def test_a_batch_of_outcomes_with_int_and_float_delays_is_one_statement(db_url: str) -> None:
    """Found trying shared limits: Retry(after=60) next to Postpone(1.5) in one batch failed the
    binary dump ("cannot dump lists of mixed types") and fell back to writing one by one."""
    from pgdispatch import sql
    from pgdispatch.worker.engine import Finish, finish_params

    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.a'), ('t.b')")
    with psycopg.connect(db_url, autocommit=True) as conn:
        claimed = conn.execute(sql.query("claim_jobs"), {
            "worker_id": "w", "queue": "default", "kinds": ["t.a", "t.b"], "version": 0, "max_jobs": 2,
            "lease_seconds": 30}).fetchall()
        batch = [Finish(claimed[0][0], claimed[0][11], "retry", delay=60, error="HTTP 500"),
                 Finish(claimed[1][0], claimed[1][11], "release", delay=1.5, error="not sent: rate")]
        written = conn.execute(sql.query("finish_jobs"), finish_params(batch)).fetchone()
    assert written == (2,)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'scheduled'") == 2
