"""Your own code on pgdispatch: the App, enqueue in the caller's transaction, the inline drain,
`worker --app`, the listener on its own URL, build stamps. The sample project in
tests/sample_app/ plays the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import pgdispatch
from pgdispatch.worker.app import load_app
from pgdispatch.worker.build import build_number, new_stamp
from tests.helpers import execute, scalar, wait_for
from tests.sample_app.pipeline import app as sample_app

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SAMPLE_SCHEMA = (TESTS / "sample_app" / "schema.sql").read_text()


def run_cli(url: str, *args: str, cwd: Path = TESTS, extra_env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING", **(extra_env or {})}
    env.pop("PGDISPATCH_APP", None) if "PGDISPATCH_APP" not in (extra_env or {}) else None
    return subprocess.run([sys.executable, "-m", "pgdispatch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- enqueue in the caller's transaction ---------------------------------------------------------

def test_enqueue_commits_and_rolls_back_with_the_callers_transaction(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        with conn.transaction():
            kept = pgdispatch.enqueue(conn, "x.kept", {"n": 1}, priority=5, tenant="acme")
        with pytest.raises(RuntimeError), conn.transaction():
            pgdispatch.enqueue(conn, "x.lost", {"n": 2})
            raise RuntimeError("the caller's own work failed")
    rows = psycopg.connect(db_url).execute("SELECT id, kind, args, priority, tenant FROM dispatch.jobs").fetchall()
    assert rows == [(kept, "x.kept", {"n": 1}, 5, "acme")]


async def test_async_enqueue_rolls_back_and_a_taken_key_returns_the_existing_job(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        first = await pgdispatch.enqueue(conn, "x.once", {}, idempotency_key="order-7")
        again = await pgdispatch.enqueue(conn, "x.once", {"other": True}, idempotency_key="order-7")
        await conn.commit()
        await pgdispatch.enqueue(conn, "x.rolled_back")
        await conn.rollback()
    assert first == again
    assert scalar(db_url, "SELECT array_agg(kind) FROM dispatch.jobs") == ["x.once"]


def test_enqueue_many_is_one_statement_and_wakes_each_queue_once(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.queues (name) VALUES ('other')")
    # Counts INSERT statements on dispatch.jobs (not rows): the test's own probe.
    execute(db_url, """CREATE TABLE insert_statements (n int);
                       CREATE FUNCTION count_insert() RETURNS trigger LANGUAGE plpgsql AS
                       $$ BEGIN INSERT INTO insert_statements VALUES (1); RETURN NULL; END $$;
                       CREATE TRIGGER count_insert AFTER INSERT ON dispatch.jobs
                       FOR EACH STATEMENT EXECUTE FUNCTION count_insert()""")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dispatch_jobs")
        with psycopg.connect(db_url) as conn:
            jobs = [pgdispatch.NewJob(kind="x.bulk", args={"i": i}, queue="other" if i % 2 else None,
                                      idempotency_key=f"k{i % 4000}")
                    for i in range(5000)]
            ids = pgdispatch.enqueue_many(conn, jobs)
            conn.commit()
        payloads = [n.payload for n in listener.notifies(timeout=1.0, stop_after=3)]
    # The last 1,000 rows repeat keys of the same batch: skipped, like a second INSERT of a key.
    assert len(ids) == 4000 and ids == sorted(ids)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 4000
    assert scalar(db_url, "SELECT count(*) FROM insert_statements") == 1
    assert sorted(payloads) == ["default", "other"]


def test_enqueue_refuses_bad_input_with_the_reason(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        with pytest.raises(pgdispatch.InvalidInput, match="job_kind_format"), conn.transaction():
            pgdispatch.enqueue(conn, "no spaces allowed")
        with pytest.raises(pgdispatch.InvalidInput, match="args must be a JSON object, got array"), \
                conn.transaction():
            pgdispatch.enqueue(conn, "x.ok", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(pgdispatch.InvalidInput, match="queues"), conn.transaction():
            pgdispatch.enqueue(conn, "x.ok", queue="no_such_queue")
        with pytest.raises(pgdispatch.InvalidInput, match="item 1 is a dict"):
            pgdispatch.enqueue_many(conn, [pgdispatch.NewJob(kind="x.ok"), {"kind": "x"}])  # type: ignore[list-item]
        assert pgdispatch.enqueue_many(conn, []) == []


# -- the App ----------------------------------------------------------------------------------------

def test_registration_mistakes_are_clear_errors() -> None:
    app = pgdispatch.App()

    def sync_function(job: pgdispatch.Job) -> pgdispatch.Outcome:
        return pgdispatch.Done()

    with pytest.raises(pgdispatch.ConfigurationError, match="must be an async function"):
        app.executor("x.sync")(sync_function)  # type: ignore[arg-type]
    with pytest.raises(pgdispatch.ConfigurationError, match="must match"):
        app.executor("has space")
    with pytest.raises(pgdispatch.ConfigurationError, match="built into pgdispatch"):
        app.executor("http.request")
    with pytest.raises(pgdispatch.ConfigurationError, match=r"timeout for 'x\.t' must be > 0"):
        app.executor("x.t", timeout=0)

    @app.executor("x.once")
    async def once(job: pgdispatch.Job) -> None:
        return None

    with pytest.raises(pgdispatch.ConfigurationError, match="registered twice"):
        app.executor("x.once")(once)
    with pytest.raises(pgdispatch.ConfigurationError, match=r"'x.typo' is not registered on this App \(registered: x.once\)"):
        app.new_job("x.typo")
    assert app.kinds["x.once"] == pgdispatch.KindOptions()


async def test_inline_drain_runs_the_pipeline_inside_a_transaction_that_rolls_back(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute(SAMPLE_SCHEMA)
        await conn.execute("INSERT INTO sample.sources (id, url) VALUES (1, 'https://a.example/x'), "
                           "(2, 'https://b.example/y')")
        for source_id in (1, 2):
            await sample_app.enqueue(conn, "source.download", {"source_id": source_id})
        await pgdispatch.enqueue(conn, "http.request", {"method": "GET"})  # not the App's: left alone
        result = await sample_app.drain(conn)
        assert (result.completed, result.retried, result.dead) == (6, 0, 0)
        assert [job.kind for job, _ in result.attempts] == [
            "source.download", "source.download", "source.extract", "source.extract",
            "source.notify", "source.notify"]
        assert [job.queue for job, _ in result.attempts][::2] == ["source_download", "source_extract",
                                                                   "source_notify"]
        rows = await (await conn.execute(
            "SELECT s.status, n.message FROM sample.sources s JOIN sample.notifications n ON n.source_id = s.id "
            "ORDER BY s.id")).fetchall()
        assert rows == [("notified", "https://a.example/x: 3 words"), ("notified", "https://b.example/y: 3 words")]
        history = await (await conn.execute(
            "SELECT kind, outcome::text FROM dispatch.job_history")).fetchall()
        assert len(history) == 6 and {o for _, o in history} == {"completed"}
        left = await (await conn.execute("SELECT kind, state::text FROM dispatch.jobs")).fetchall()
        assert left == [("http.request", "available")]
        await conn.rollback()
    # The test's transaction rolled back: nothing of it is left, jobs included.
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    assert scalar(db_url, "SELECT to_regclass('sample.sources')") is None


async def test_inline_drain_records_retries_timeouts_and_dead_letters(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute(SAMPLE_SCHEMA)
        flaky = await sample_app.enqueue(conn, "sample.flaky")
        bad = await sample_app.enqueue(conn, "source.download", {"source_id": "seven"})
        slow = await sample_app.enqueue(conn, "sample.slow", {"seconds": 5}, max_attempts=1)
        first = await sample_app.drain(conn)
        # One pass: the flaky job failed once and waits for its backoff; the others are dead.
        assert (first.completed, first.retried, first.dead) == (0, 1, 2)
        outcomes = {job.id: outcome for job, outcome in first.attempts}
        assert isinstance(outcomes[flaky], pgdispatch.Retry)
        assert outcomes[flaky].error == "ConnectionError: the remote hung up (attempt 1)"
        assert outcomes[bad] == pgdispatch.Discard("invalid", "source_id must be an integer, got 'seven'")
        assert isinstance(outcomes[slow], pgdispatch.Retry)
        assert outcomes[slow].error == "timed out after 0.2s (timeout of kind sample.slow)"
        # with_scheduled: retries run at once, until done or out of attempts.
        second = await sample_app.drain(conn, with_scheduled=True)
        assert (second.completed, second.retried) == (1, 1)
        dead = await (await conn.execute(
            "SELECT job_id, reason, last_error FROM dispatch.dead_jobs ORDER BY job_id")).fetchall()
        assert dead == [(bad, "invalid", "source_id must be an integer, got 'seven'"),
                        (slow, "exhausted", "timed out after 0.2s (timeout of kind sample.slow)")]
        assert await (await conn.execute("SELECT count(*) FROM dispatch.jobs")).fetchone() == (0,)
        row = await (await conn.execute(
            "SELECT attempt, detail FROM dispatch.job_history WHERE job_id = %s AND outcome = 'completed'",
            (flaky,))).fetchone()
        assert row == (3, {"attempts": 3})


async def test_inline_drain_stops_a_job_that_enqueues_itself_forever(db_url: str) -> None:
    app = pgdispatch.App()

    @app.executor("x.forever")
    async def forever(job: pgdispatch.Job) -> None:
        async with job.connection() as conn:
            await app.enqueue(conn, "x.forever")

    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await app.enqueue(conn, "x.forever")
        with pytest.raises(pgdispatch.PgDispatchError, match="drain stopped after 50 jobs"):
            await app.drain(conn, max_jobs=50)
    with psycopg.connect(db_url) as sync_conn, \
            pytest.raises(pgdispatch.PgDispatchError, match=r"needs a psycopg\.AsyncConnection"):
        await app.drain(sync_conn)  # type: ignore[arg-type]


async def test_job_connection_outside_an_app_says_so() -> None:
    job = pgdispatch.Job(id=1, queue="default", kind="x", args={}, priority=0, attempt=1, max_attempts=1,
                         tenant=None, run_at=None, expire_at=None, created_at=None,  # type: ignore[arg-type]
                         lease_token=None, expired=False)  # type: ignore[arg-type]
    with pytest.raises(pgdispatch.PgDispatchError, match=r"for executors registered on a pgdispatch\.App"):
        job.connection()


# -- worker --app -----------------------------------------------------------------------------------

def test_worker_runs_the_sample_pipeline_with_app(db_url: str) -> None:
    execute(db_url, SAMPLE_SCHEMA)
    execute(db_url, "INSERT INTO sample.sources (id, url) SELECT i, 'https://src.example/' || i "
                    "FROM generate_series(1, 30) i")
    with psycopg.connect(db_url) as conn:
        pgdispatch.enqueue_many(conn, [sample_app.new_job("source.download", {"source_id": i})
                                       for i in range(1, 31)])
        pgdispatch.enqueue(conn, "debug.noop")  # a built-in kind the worker leaves waiting
        conn.commit()
    out = run_cli(db_url, "worker", "--app", "sample_app.pipeline:app", "--drain", "--processes", "2")
    assert out.returncode == 0, out.stderr
    assert scalar(db_url, "SELECT count(*) FROM sample.notifications") == 30
    assert scalar(db_url, "SELECT count(DISTINCT status) FROM sample.sources") == 1
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 90
    assert scalar(db_url, "SELECT array_agg(DISTINCT queue ORDER BY queue) FROM dispatch.job_history") == [
        "source_download", "source_extract", "source_notify"]
    # The worker recorded the App's kinds next to the built-in ones.
    kinds = scalar(db_url, "SELECT kinds FROM dispatch.workers LIMIT 1")
    assert {"source.download", "source.extract", "source.notify", "http.request"} <= set(kinds)
    assert "debug.noop" not in kinds
    status = run_cli(db_url, "status")
    assert status.returncode == 0
    assert "1 debug.noop job(s) in queue 'default' wait and no live worker serves that queue" in status.stderr


def test_app_mistakes_are_one_line_and_exit_2(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "raises.py").write_text("raise RuntimeError('settings.DATABASE is not configured')\n")
    (tmp_path / "syntax.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "not_an_app.py").write_text("app = {'kinds': []}\n")
    cases = {
        "nosuchmodule:app": "cannot import nosuchmodule: ModuleNotFoundError: No module named 'nosuchmodule'",
        "raises:app": "cannot import raises: RuntimeError: settings.DATABASE is not configured",
        "syntax:app": "cannot import syntax: SyntaxError",
        "not_an_app:app": "app is a dict, not a pgdispatch.App",
        "not_an_app:missing": "module not_an_app has no attribute 'missing'",
        "not_an_app": "must be module:attribute",
        "./sub/not_an_app.py:app": "give a module name, not a file path (--app sub.not_an_app:app)",
    }
    for spec, message in cases.items():
        out = run_cli(db_url, "worker", "--app", spec, cwd=tmp_path)
        assert out.returncode == 2, (spec, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (spec, out.stderr)
    # The same from the environment.
    out = run_cli(db_url, "worker", cwd=tmp_path, extra_env={"PGDISPATCH_APP": "raises:app"})
    assert out.returncode == 2 and "RuntimeError" in out.stderr
    with pytest.raises(pgdispatch.ConfigurationError, match="must be module:attribute"):
        load_app(":app")


# -- the listener on its own URL ------------------------------------------------------------------

def test_the_listener_uses_its_own_url_and_claims_do_not(db_url: str) -> None:
    claims_url = psycopg.conninfo.make_conninfo(db_url, application_name="pgd_claims")
    listen_url = psycopg.conninfo.make_conninfo(db_url, application_name="pgd_listen")
    env = {**os.environ, "DATABASE_URL": claims_url, "PGDISPATCH_LISTEN_URL": listen_url,
           "PGDISPATCH_LOG": "WARNING"}
    # Polling once a minute: a job that runs within seconds was woken by a notification.
    proc = subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--debug-kinds",
                             "--poll-interval", "60s", "--grace", "1s"], cwd=TESTS, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers WHERE stopped_at IS NULL") == 1)
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                         "'pgd_listen' AND query ILIKE 'LISTEN%%'") >= 1)
        execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop')")
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history") == 1, timeout=20)
        listening = scalar(db_url, "SELECT array_agg(DISTINCT application_name) FROM pg_stat_activity "
                                   "WHERE query ILIKE 'LISTEN%%' AND datname = current_database()")
        assert listening == ["pgd_listen"]
        assert scalar(db_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgd_claims'") >= 1
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_an_unreachable_listen_url_is_one_line_and_exit_4(db_url: str) -> None:
    out = run_cli(db_url, "worker", "--listen-url", "postgresql://nobody@127.0.0.1:1/x?connect_timeout=2")
    assert out.returncode == 4, out.stderr
    assert out.stderr.startswith("error: --listen-url: database unavailable") and len(out.stderr.splitlines()) == 1


# -- build stamps -----------------------------------------------------------------------------------

def test_build_stamps_order_by_time_and_drive_the_version_guard(db_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime
    older = new_stamp("ffff", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    newer = new_stamp("0000", datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert older == "ffff-20260102030405"
    assert build_number(older, source="t") < build_number(newer, source="t")
    stamp_file = tmp_path / "version"
    out = run_cli(db_url, "build", "stamp", "--sha", "abc1234", "--file", str(stamp_file), "--json")
    assert out.returncode == 0, out.stderr
    number = build_number(stamp_file.read_text(), source="t")
    # A producer on the new build stamps its jobs; a worker on an older build leaves them.
    with psycopg.connect(db_url, options=f"-c dispatch.build={number + 1}") as conn:
        pgdispatch.enqueue(conn, "debug.noop")
        conn.commit()
    out = run_cli(db_url, "worker", "--debug-kinds", "--drain",
                  extra_env={"PGDISPATCH_BUILD_FILE": str(stamp_file)})
    assert out.returncode == 0, out.stderr
    assert scalar(db_url, "SELECT version FROM dispatch.workers") == number
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1
    out = run_cli(db_url, "worker", "--debug-kinds", "--drain", extra_env={"PGDISPATCH_BUILD": str(number + 1)})
    assert out.returncode == 0, out.stderr
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    bad = run_cli(db_url, "status", extra_env={"PGDISPATCH_BUILD": "v1.2"})
    assert bad.returncode == 2 and "PGDISPATCH_BUILD must be a build number (42) or a stamp" in bad.stderr



# -- deploy/ ----------------------------------------------------------------------------------------

def test_the_deploy_examples_parse_and_stop_after_the_grace_period() -> None:
    import configparser
    import shlex

    from pgdispatch.console.main import build_parser

    parser = build_parser()
    unit = (ROOT / "deploy" / "systemd" / "pgdispatch@.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    argv = shlex.split(settings["ExecStart"].replace("$WORKER_ARGS", "--queue source_download"))[1:]
    args = parser.parse_args(argv)
    assert args.exit_on_newer and int(settings["TimeoutStopSec"]) > args.grace
    assert settings["Restart"] == "always" and settings["KillMode"] == "mixed"
    supervisor = configparser.ConfigParser(interpolation=None)
    supervisor.read(ROOT / "deploy" / "supervisor" / "pgdispatch.conf")
    programs = [s for s in supervisor.sections() if s.startswith("program:")]
    assert len(programs) == 3
    for section in programs:
        program = supervisor[section]
        args = parser.parse_args(shlex.split(program["command"])[1:])
        assert args.app == "myproject.jobs:app" and args.exit_on_newer
        assert int(program["stopwaitsecs"]) > args.grace and program["stopasgroup"] == "false"
