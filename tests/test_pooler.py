"""Behind a real PgBouncer in transaction mode (issue 19, items 18-21): Debian's package, started
by each test in front of the test server. Each test says how it failed before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgdispatch.worker.engine import Engine
from tests import pgbouncer
from tests.helpers import scalar

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not pgbouncer.installed(), reason="pgbouncer is not installed (.ci/run installs it)")


def cli(url: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING", **env})


def test_a_worker_behind_a_transaction_pooler_drains_everything_with_prepared_statements_off(db_url: str) -> None:
    # Before: psycopg prepares a statement after 5 executions and nothing turned that off; a
    # 5,500-job drain through PgBouncer left 101-4,900 jobs behind, with 158 `prepared statement
    # "_pg3_0" does not exist / already exists` errors.
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 3000)")
    with pgbouncer.pgbouncer(db_url) as pooled:
        done = cli(pooled, "worker", "--drain", "--debug-kinds", "--transaction-pooler", "--listen-url", db_url)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "prepared statement" not in done.stderr
        # The CLI and its environment switch: many statements, none prepared.
        for _ in range(12):
            shown = cli(pooled, "status", "--json", PGDISPATCH_TRANSACTION_POOLER="1")
            assert shown.returncode == 0, shown.stderr
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 3000


def test_migrate_through_a_transaction_pooler_never_hangs(empty_db_url: str) -> None:
    # Before: alembic/env.py took a session advisory lock and released it in a later
    # transaction, which landed on another server connection: the lock stayed held on a pooled
    # connection and the next migration waited for ever.
    with pgbouncer.pgbouncer(empty_db_url, pool_size=2) as pooled:
        stop = threading.Event()

        def traffic() -> None:  # other clients of the pooler: server connections change hands
            with psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as other:
                while not stop.is_set():
                    other.execute("SELECT pg_sleep(0.002)")

        busy = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
        for thread in busy:
            thread.start()
        try:
            for _ in range(5):
                migrated = cli(pooled, "migrate", timeout=60, PGDISPATCH_TRANSACTION_POOLER="1")
                assert migrated.returncode == 0, migrated.stderr[-2000:]
        finally:
            stop.set()
            for thread in busy:
                thread.join(10)
        together = [subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "migrate"], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, "DATABASE_URL": pooled, "PGDISPATCH_TRANSACTION_POOLER": "1"})
                    for _ in range(3)]
        assert [p.wait(60) for p in together] == [0, 0, 0]
        # No lock left behind on the pooler's server connections (they are still open here), so
        # a migration that reaches the server another way is not kept waiting.
        assert scalar(empty_db_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        direct = cli(empty_db_url, "migrate", timeout=30)
        assert direct.returncode == 0, direct.stderr[-2000:]


def test_the_build_stamp_set_for_a_transaction_stays_in_it(db_url: str) -> None:
    # Before: the README's `SET dispatch.build` is a session setting: through the pooler it
    # stamped another producer's job with a build no worker has. SET LOCAL (or
    # set_config(..., true)) is the form that works behind a transaction pooler.
    with pgbouncer.pgbouncer(db_url, pool_size=1) as pooled, \
            psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as a, \
            psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as b:  # one server connection
        with a.transaction():
            a.execute("SET LOCAL dispatch.build = '42'")
            mine = a.execute("SELECT dispatch.enqueue('k')").fetchone()[0]  # type: ignore[index]
        with a.transaction():
            a.execute("SELECT set_config('dispatch.build', '43', true)")
            mine_too = a.execute("SELECT dispatch.enqueue('k')").fetchone()[0]  # type: ignore[index]
        theirs = b.execute("SELECT dispatch.enqueue('k')").fetchone()[0]  # type: ignore[index]
    versions = dict(psycopg.connect(db_url).execute("SELECT id, version FROM dispatch.jobs").fetchall())
    assert versions == {mine: 42, mine_too: 43, theirs: 0}


async def test_maintenance_leaves_no_setting_behind_on_a_pooled_connection(db_url: str) -> None:
    # Before: history maintenance sent `SET lock_timeout = 1s` on its own connection; through
    # the pooler that is a session setting left on a server connection for whoever gets it next.
    with pgbouncer.pgbouncer(db_url, pool_size=1) as pooled:
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute("SELECT dispatch.create_history_partition('2000-01-01')")
        pool = AsyncConnectionPool(pooled, min_size=1, max_size=1, open=False,
                                   kwargs={"autocommit": True, "prepare_threshold": None})
        await pool.open()
        try:
            engine = Engine(pool, database_url=pooled, worker_id="w", version=0, lease_seconds=30)
            assert await engine.maintain(history_keep_seconds=14 * 86400, dead_keep_seconds=30 * 86400) == 1
        finally:
            await pool.close()
        with psycopg.connect(pooled, autocommit=True, prepare_threshold=None) as other:
            assert other.execute("SHOW lock_timeout").fetchone() == ("0",)


def test_a_worker_whose_listen_url_is_the_pooler_says_so(db_url: str) -> None:
    # Before: with both URLs at the pooler the worker LISTENed through it, heard nothing, and
    # fell back to polling (0.4-2.4 s instead of ~5 ms) without a word.
    with pgbouncer.pgbouncer(db_url) as pooled:
        done = cli(pooled, "worker", "--drain", "--debug-kinds", "--transaction-pooler")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "did not reach this worker's LISTEN connection" in done.stderr
    assert "give --listen-url a direct URL" in done.stderr
