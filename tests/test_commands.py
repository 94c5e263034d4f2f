"""Periodic commands (seed 001): one run per tick across workers, missed ticks, switches, locks,
the CLI. The sample project's commands are in tests/sample_app/ops.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

import pgdispatch
from pgdispatch.console import main as cli
from pgdispatch.worker.commands import Command, CommandScheduler, register_commands
from tests.helpers import execute, scalar, wait_for

TESTS = Path(__file__).resolve().parent
SAMPLE_SCHEMA = (TESTS / "sample_app" / "schema.sql").read_text()
EVERY_MINUTE = Command("every-minute", "Every Minute", "* * * * *")


@pytest.fixture
def env_db(db_url: str) -> Iterator[str]:
    os.environ["DATABASE_URL"] = db_url
    try:
        yield db_url
    finally:
        del os.environ["DATABASE_URL"]


def start_pool(db_url: str, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--app", "sample_app.ops:app", *args],
                            cwd=TESTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def scheduler_at(db_url: str, now: datetime, *commands: Command) -> tuple[CommandScheduler, AsyncConnectionPool]:
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=1, open=False, kwargs={"autocommit": True})
    await pool.open()
    return CommandScheduler(pool, commands, clock=lambda: now), pool


def test_a_command_needs_a_cron_schedule_and_a_key() -> None:
    app = pgdispatch.App()
    with pytest.raises(pgdispatch.ConfigurationError, match="is not a cron schedule"):
        app.command("x", "X", schedule="every five minutes")
    with pytest.raises(pgdispatch.ConfigurationError, match="command key 'has space'"):
        app.command("has space", "X", schedule="* * * * *")

    @app.command("once", "Once", schedule="* * * * *")
    async def once(job: pgdispatch.Job) -> None:
        return None

    with pytest.raises(pgdispatch.ConfigurationError, match="registered twice"):
        app.command("once", "Once", schedule="* * * * *")
    assert [c.key for c in app.commands] == ["once"] and "command:once" in app.kinds


@pytest.mark.chaos
def test_each_tick_runs_once_across_three_worker_processes(db_url: str) -> None:
    execute(db_url, SAMPLE_SCHEMA)
    pool = start_pool(db_url, "--processes", "3")
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM sample.ticks") >= 5, 60)
    finally:
        pool.send_signal(signal.SIGTERM)
        out, _ = pool.communicate(timeout=60)
    assert pool.returncode == 0, out
    rows = psycopg.connect(db_url).execute("SELECT tick, pid, args FROM sample.ticks").fetchall()
    ticks = [r[0] for r in rows]
    assert len(ticks) == len(set(ticks)), "a tick ran twice"
    assert {r[2] for r in rows} == {"service1,service2"}
    assert all(t.microsecond == 0 for t in ticks)  # whole seconds: the schedule's ticks
    assert scalar(db_url, "SELECT count(*) FROM dispatch.workers") == 3
    assert scalar(db_url, "SELECT count(*) FROM dispatch.command_runs WHERE key = 'tick-recorder'") >= len(ticks)


async def test_ticks_missed_while_no_worker_ran_are_run_once(db_url: str) -> None:
    now = datetime(2026, 11, 24, 12, 30, 20, tzinfo=UTC)
    scheduler, pool = await scheduler_at(db_url, now, EVERY_MINUTE)
    try:
        async with pool.connection() as conn:
            await register_commands(conn, [EVERY_MINUTE], now)
        # Registered now: the first run is the next tick, not the ones before.
        await scheduler.tick()
        assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
        assert scalar(db_url, "SELECT next_tick FROM dispatch.commands") == datetime(2026, 11, 24, 12, 31, tzinfo=UTC)
        # Ten minutes with no worker: one run, for the latest tick.
        execute(db_url, "UPDATE dispatch.commands SET last_tick = %s", (now - timedelta(minutes=10),))
        await scheduler.tick()
        await scheduler.tick()  # a second worker asking for the same tick gets nothing
        runs = psycopg.connect(db_url).execute("SELECT tick FROM dispatch.command_runs").fetchall()
        assert runs == [(datetime(2026, 11, 24, 12, 30, tzinfo=UTC),)]
        job = psycopg.connect(db_url).execute("SELECT kind, max_attempts, args FROM dispatch.jobs").fetchone()
        assert job == ("command:every-minute", 1, {"args": [], "tick": "2026-11-24T12:30:00+00:00", "manual": False})
    finally:
        await pool.close()


async def test_switches_locks_and_the_safe_to_stop_question(env_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    db_url = env_db
    now = datetime.now(UTC)
    scheduler, pool = await scheduler_at(db_url, now, EVERY_MINUTE)
    try:
        async with pool.connection() as conn:
            await register_commands(conn, [EVERY_MINUTE], now)
        assert cli.main(["commands", "safe-to-stop"]) == 0
        assert "safe to stop: yes" in capsys.readouterr().out
        assert cli.main(["commands", "disable", "--all", "--reason", "DB restart"]) == 0
        execute(db_url, "UPDATE dispatch.commands SET last_tick = now() - interval '1 hour'")
        await scheduler.tick()  # disabled: the tick is recorded as skipped, nothing runs
        assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
        assert scalar(db_url, "SELECT status FROM dispatch.command_status") == "Disabled"
        # run overrides the switch (an operator asked), never the lock.
        assert cli.main(["commands", "run", "every-minute"]) == 0
        assert cli.main(["commands", "run", "every-minute"]) == 1
        assert "its previous run is still queued or running" in capsys.readouterr().out
        assert scalar(db_url, "SELECT status FROM dispatch.command_status") == "Queued"
        assert cli.main(["commands", "safe-to-stop"]) == 1
        assert "safe to stop: no, every-minute is Queued" in capsys.readouterr().out
        # Its worker took it and died: the lease ran out, the lock is stale.
        execute(db_url, "UPDATE dispatch.jobs SET state = 'running', leased_by = 'vm:4242:dead', leased_at = now(), lease_token = gen_random_uuid(), "
                        "lease_expires_at = now() - interval '1 s', attempt = 1")
        row = psycopg.connect(db_url).execute("SELECT status, holder FROM dispatch.command_status").fetchone()
        assert row == ("Locked", "vm:4242:dead")
        assert cli.main(["commands", "status", "--json"]) == 0
        assert '"status": "Locked"' in capsys.readouterr().out
        assert cli.main(["commands", "unlock", "every-minute", "--reason", "worker host lost"]) == 0
        assert "1 stale run given up" in capsys.readouterr().out
        dead = psycopg.connect(db_url).execute("SELECT reason, last_error FROM dispatch.dead_jobs").fetchone()
        assert dead[0] == "discarded" and dead[1].startswith("unlocked by ") and dead[1].endswith(": worker host lost")
        assert scalar(db_url, "SELECT outcome::text FROM dispatch.job_history WHERE error LIKE 'unlocked by %%'") == "dead"
        assert scalar(db_url, "SELECT status FROM dispatch.command_status") == "Disabled"
        assert cli.main(["commands", "enable", "--all"]) == 0
        assert scalar(db_url, "SELECT status FROM dispatch.command_status") == "Idle"
        audit = psycopg.connect(db_url).execute("SELECT action, target, reason FROM dispatch.audit_log ORDER BY id").fetchall()
        assert audit == [("disable", "command:*", "DB restart"), ("run now", "command:every-minute", None),
                         ("unlock", "command:every-minute", "worker host lost"), ("enable", "command:*", None)]
        # Mistakes: one line and a documented code.
        assert cli.main(["commands", "disable"]) == 2
        assert cli.main(["commands", "disable", "every-minute", "--all"]) == 2
        assert cli.main(["commands", "run", "nope"]) == 3
        assert "no command 'nope'" in capsys.readouterr().err
    finally:
        await pool.close()


@pytest.mark.chaos
def test_a_worker_killed_mid_run_leaves_a_lock_shown_stale_until_unlocked(env_db: str) -> None:
    db_url = env_db
    execute(db_url, SAMPLE_SCHEMA)
    pool = start_pool(db_url, "--lease", "2s", extra_env={"SAMPLE_IMPORT_SECONDS": "600"})
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.commands") == 2)
        assert cli.main(["commands", "run", "slow-import"]) == 0
        wait_for(lambda: scalar(db_url, "SELECT status FROM dispatch.command_status WHERE key = 'slow-import'") == "Working")
        child = scalar(db_url, "SELECT pid FROM dispatch.workers WHERE stopped_at IS NULL")
        os.kill(pool.pid, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
        pool.communicate(timeout=30)
    finally:
        if pool.poll() is None:
            pool.kill()
    wait_for(lambda: scalar(db_url, "SELECT status FROM dispatch.command_status WHERE key = 'slow-import'") == "Locked", 10)
    assert cli.main(["commands", "safe-to-stop"]) == 1
    assert cli.main(["commands", "unlock", "slow-import"]) == 0
    assert scalar(db_url, "SELECT status FROM dispatch.command_status WHERE key = 'slow-import'") == "Idle"
