"""Operators and new users (issue 19, items 22 and 25-28): bulk actions that say what they
skipped, Ctrl-C, a database without the schema, the embedded server, and the smaller ones. Each
test says how it failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import execute, scalar, wait_for

ROOT = Path(__file__).resolve().parent.parent


def bury(db_url: str, kind: str = "k", **columns: Any) -> int:
    """A dead job, as the engine leaves one."""
    names = ", ".join(columns)
    values = ", ".join(f"%({c})s" for c in columns)
    with psycopg.connect(db_url, autocommit=True) as c:
        row = c.execute(f"INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, version, attempt, "
                        f"reason, created_at{', ' + names if names else ''}) VALUES (nextval(pg_get_serial_sequence("
                        f"'dispatch.jobs', 'id')), 'default', %(kind)s, '{{}}', 0, 0, 3, 'exhausted', now()"
                        f"{', ' + values if values else ''}) RETURNING job_id", {"kind": kind, **columns}).fetchone()
    assert row is not None
    return int(row[0])


# -- 22. a bulk action does what it can and names what it skipped ---------------------------------

def test_dead_retry_all_revives_the_rest_and_names_the_expired_one(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    # Before: `dead retry --all` exited 2 and revived nothing when one dead job was an expired
    # request ("give a new expire_at").
    first, expired, last = bury(db_url), bury(db_url, expire_at="2000-01-01"), bury(db_url)
    code, out, _ = run("dead", "retry", "--all")
    assert code == 5, out
    assert "2 dead jobs back in the queue; 1 skipped:" in out
    assert f"job {expired}: expired; give a new expire_at to revive it" in out
    assert sorted(r[0] for r in psycopg.connect(db_url).execute("SELECT id FROM dispatch.jobs").fetchall()) == [first, last]
    code, out, _ = run("dead", "retry", str(expired), "999", "--json")
    assert code == 5 and json.loads(out)["skipped"] == [
        {"job_id": expired, "reason": "expired; give a new expire_at to revive it"},
        {"job_id": 999, "reason": "not a dead job"}]
    assert run("dead", "retry", "999")[0] == 3  # nothing to do at all: not found
    assert run("dead", "retry", str(expired), "--expire-in", "1d")[0] == 0


def test_reviving_a_lead_delivery_that_was_resent_since_skips_it_with_the_reason(db_url: str) -> None:
    # Before: retry_dead of a lead delivery whose lead was resent meanwhile failed on a raw
    # `duplicate key value violates unique constraint "deliveries_one_pending"` and aborted the
    # whole batch, the other dead jobs included.
    with psycopg.connect(db_url, autocommit=True) as c:
        credential = c.execute("INSERT INTO dispatch.credentials (type, name, settings) VALUES ('webhooks', 'h', "
                               "'{\"url\": \"https://h.example/x\"}') RETURNING id").fetchone()[0]  # type: ignore[index]
        c.execute("INSERT INTO dispatch.entity_credentials VALUES (1, %s)", (credential,))
        c.execute("INSERT INTO dispatch.leads (id, external_entity_id) VALUES (1, 1)")
        c.execute("SELECT dispatch.send_lead(1)")
        job = c.execute("SELECT job_id FROM dispatch.deliveries").fetchone()[0]  # type: ignore[index]
        token = c.execute("SELECT lease_token FROM dispatch.claim_jobs_v2('w', 'leads', '{lead.deliver}', 0, 1, "
                          "'30 s')").fetchone()[0]  # type: ignore[index]
        c.execute("SELECT dispatch.finish_jobs_v2(%s, %s, '{dead}', '{NULL}', '{exhausted}', '{refused}', "
                  "'{NULL}', '{NULL}')", ([job], [token]))
        c.execute("SELECT dispatch.send_lead(1)")  # resent: a new delivery is under way
        other = bury(db_url)
        rows = c.execute("SELECT job_id, revived, reason FROM dispatch.retry_dead_v2(%s)", ([job, other],)).fetchall()
        assert rows == [(job, False, "its lead is on its way to that integration again (a newer delivery): "
                                     "see leads show"), (other, True, None)]
        # The previous release's retry_dead does the same, with a notice instead of an error.
        assert c.execute("SELECT * FROM dispatch.retry_dead(%s)", ([job],)).fetchall() == []


# -- 25. Ctrl-C waits the grace period; a second one releases ----------------------------------------

@pytest.mark.chaos
def test_ctrl_c_in_a_terminal_waits_for_running_jobs(db_url: str) -> None:
    # Before: the terminal's SIGINT reached the pool and its children (one process group); each
    # child took it as the first signal and the pool's relayed SIGTERM as the second, so the
    # running jobs were released at once.
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('debug.sleep', '{\"seconds\": 2}')")
    pool = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--debug-kinds", "--processes", "2"],
                            env={**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 1, 30)
        os.killpg(pool.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        out, _ = pool.communicate(timeout=30)
    finally:
        if pool.poll() is None:
            pool.kill()
    assert pool.returncode == 0, out
    assert scalar(db_url, "SELECT outcome FROM dispatch.job_history") == "completed"


@pytest.mark.chaos
def test_a_second_ctrl_c_releases_the_running_jobs(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('debug.sleep', '{\"seconds\": 30}')")
    pool = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--debug-kinds"],
                            env={**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 1, 30)
        os.killpg(pool.pid, signal.SIGINT)
        time.sleep(0.5)  # a person pressing it twice
        os.killpg(pool.pid, signal.SIGINT)
        out, _ = pool.communicate(timeout=20)
    finally:
        if pool.poll() is None:
            pool.kill()
    assert pool.returncode == 0, out
    assert scalar(db_url, "SELECT state::text FROM dispatch.jobs") == "available"  # released, attempt not counted
    assert scalar(db_url, "SELECT attempt FROM dispatch.jobs") == 0


# -- 26. a worker on a database without the schema: one line ----------------------------------------

def test_a_worker_on_a_database_without_the_schema_says_to_migrate_in_one_line(empty_db_url: str) -> None:
    # Before: five tracebacks, a restart loop, then the pool gave up.
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "worker"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DATABASE_URL": empty_db_url, "PGDISPATCH_LOG": "WARNING"})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "run: pgdispatch migrate" in done.stderr and "Traceback" not in done.stderr


# -- 27. the embedded server is never chosen silently ------------------------------------------------

def cli_in(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGDISPATCH_HOME")}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=directory, env={**environment, "PGDISPATCH_LOG": "WARNING", **env})


def test_an_empty_database_url_is_a_mistake_not_the_embedded_server(tmp_path: Path) -> None:
    # Before: DATABASE_URL= counted as unset (a risk for the systemd unit): an embedded server
    # was created under ./.pgdispatch and the command ran against it.
    done = cli_in(tmp_path, "status", DATABASE_URL="")
    assert done.returncode == 2 and "DATABASE_URL is set but empty" in done.stderr
    assert not (tmp_path / ".pgdispatch").exists()


def test_a_read_only_command_elsewhere_creates_no_server(tmp_path: Path) -> None:
    # Before: any command run in another directory created and started a new embedded server
    # under ./.pgdispatch, left it running, and then said the schema was missing.
    done = cli_in(tmp_path, "status")
    assert done.returncode == 4
    assert f"DATABASE_URL is unset and there is no embedded PostgreSQL in {tmp_path.resolve()}/.pgdispatch" \
        in done.stderr
    assert not (tmp_path / ".pgdispatch").exists()


@pytest.mark.chaos
def test_a_command_on_the_embedded_server_says_so_and_stops_what_it_started() -> None:
    home = Path("/tmp") / f"pgd-e-{os.getpid()}"  # short: the socket lives under it
    try:
        created = cli_in(ROOT, "migrate", PGDISPATCH_HOME=str(home))
        assert created.returncode == 0, created.stderr
        assert f"using the embedded PostgreSQL in {home}" in created.stderr
        assert cli_in(ROOT, "embedded", "stop", PGDISPATCH_HOME=str(home)).returncode == 0
        shown = cli_in(ROOT, "status", "--json", PGDISPATCH_HOME=str(home))
        assert shown.returncode == 0, shown.stderr
        assert "started it" in shown.stderr and "stopped the embedded PostgreSQL it had started" in shown.stderr
        assert "embedded PostgreSQL was not running" in cli_in(ROOT, "embedded", "stop", PGDISPATCH_HOME=str(home)).stdout
    finally:
        cli_in(ROOT, "embedded", "stop", PGDISPATCH_HOME=str(home))
        import shutil

        shutil.rmtree(home, ignore_errors=True)


# -- 28. the smaller ones -------------------------------------------------------------------------------

def test_a_dead_request_shows_its_budget_and_expiry(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    # Before: `request show` printed `max_attempts: -` and `expire_at: -` for dead requests (NULLs
    # hard-coded in its query), and `dead show` and dead_job_list had no max_attempts.
    job = bury(db_url, "http.request", max_attempts=7, expire_at="2031-01-01T00:00:00+00:00")
    code, out, _ = run("request", "show", str(job), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["max_attempts"] == 7 and shown["expire_at"].startswith("2031-01-01")
    code, out, _ = run("dead", "show", str(job), "--json")
    assert code == 0 and json.loads(out)["max_attempts"] == 7
    assert scalar(db_url, "SELECT max_attempts FROM dispatch.dead_job_list WHERE job_id = %s", (bury(db_url),)) == 25


@pytest.mark.parametrize(("env", "message"), [
    ({"PGDISPATCH_LOG": "bogus"}, "PGDISPATCH_LOG='bogus': one of DEBUG, INFO, WARNING, ERROR"),
    ({"PGDISPATCH_TRANSACTION_POOLER": "maybe"}, "PGDISPATCH_TRANSACTION_POOLER='maybe': say 1 or 0"),
])
def test_a_bad_environment_setting_is_one_line_and_exit_2(tmp_path: Path, env: dict[str, str], message: str) -> None:
    # Before: PGDISPATCH_LOG=bogus was accepted silently.
    done = cli_in(tmp_path, "status", DATABASE_URL="postgresql://nobody@127.0.0.1:1/x", **env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"error: {message}" in done.stderr


def test_a_home_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # Before: a traceback.
    (tmp_path / "home").write_text("")
    done = cli_in(tmp_path, "status", PGDISPATCH_HOME=str(tmp_path / "home"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "PGDISPATCH_HOME" in done.stderr


def test_enqueue_names_a_missing_queue_and_the_kind_rule(run) -> None:  # type: ignore[no-untyped-def]
    # Before: a raw foreign-key message, and a kind refused without its naming rule.
    code, _, err = run("enqueue", "debug.noop", "--queue", "nosuchq")
    assert code == 2 and "no queue 'nosuchq' (job_queue_must_exist_in_dispatch_queues): create it first with " \
        "pgdispatch queues create NAME" in err
    code, _, err = run("enqueue", "bad kind")
    assert code == 2 and "breaks the naming rule (job_kind_format): a letter, digit or _ first, then letters, " \
        "digits and _ . : -" in err


async def test_a_workers_slots_are_held_under_its_name_in_dispatch_workers(db_url: str) -> None:
    # Before: limit_slots.holder was a random `limits:...` name that no row of dispatch.workers
    # had: an operator could not tell whose slots they were.
    import asyncio
    import contextlib

    from aiohttp import web

    from pgdispatch.worker.config import WorkerConfig
    from pgdispatch.worker.process import run_worker
    from tests.helpers import served, wait_until

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    async with served(hang) as url:
        execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES (%s, 2)",
                (f"host:{url.removeprefix('http://')}",))
        execute(db_url, "SELECT dispatch.send_request('POST', %s, http_timeout => 30)", (f"{url}/x",))
        worker = asyncio.create_task(run_worker(WorkerConfig(database_url=db_url, queues=("requests",))))
        try:
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.limit_slots"), 20)
            holder = scalar(db_url, "SELECT holder FROM dispatch.limit_slots")
            assert scalar(db_url, "SELECT count(*) FROM dispatch.workers WHERE id = %s", (holder,)) == 1
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
