"""Every cli.py command: the happy path and the error path, with real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgdispatch.console import main as cli
from tests.helpers import execute, scalar

ROOT = Path(__file__).resolve().parent.parent


def test_enqueue_and_status(run) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run("enqueue", "debug.noop", "--args", '{"a": 1}', "--json")
    assert code == 0 and json.loads(out)["id"] == 1
    code, out, _ = run("enqueue", "debug.noop", "--run-in", "10m", "--priority", "3", "--tenant", "acme")
    assert code == 0 and out.strip() == "enqueued job 2"
    code, out, _ = run("status", "--json")
    stats = json.loads(out)
    default = next(q for q in stats["queues"] if q["queue"] == "default")
    assert code == 0 and default["available"] == 1 and default["scheduled"] == 1
    code, out, _ = run("status")
    assert code == 0 and "default" in out


def test_enqueue_errors(run) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run("enqueue", "debug.noop", "--args", "{not json")
    assert code == 2 and "not valid JSON" in err
    code, _, err = run("enqueue", "debug.noop", "--args", "[1]")
    assert code == 2 and "must be a JSON object" in err
    code, _, err = run("enqueue", "debug.noop", "--queue", "missing")
    assert code == 2 and "no queue 'missing'" in err
    code, _, err = run("enqueue", "debug.noop", "--priority", "500")
    assert code == 2 and "job_priority_between_minus_100_and_100" in err
    code, _, err = run("enqueue", "debug.noop", "--run-in", "soon")
    assert code == 2 and "not a duration" in err


def test_idempotent_enqueue_returns_the_same_id(run) -> None:  # type: ignore[no-untyped-def]
    _, first, _ = run("enqueue", "k", "--idempotency-key", "abc", "--json")
    _, second, _ = run("enqueue", "k", "--idempotency-key", "abc", "--json")
    assert json.loads(first) == {"id": 1, "created": True}
    assert json.loads(second) == {"id": 1, "created": False}  # deduplicated, and says so
    code, out, _ = run("enqueue", "k", "--idempotency-key", "abc")
    assert code == 0 and out.strip() == "not enqueued: idempotency key 'abc' is already taken by job 1"


def test_dead_list_show_retry_purge(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    execute(db_url, "SELECT dispatch.enqueue('debug.fail', '{\"api_key\": \"sk-123\"}', max_attempts => 1)")
    execute(db_url, "SELECT dispatch.enqueue('debug.fail', max_attempts => 1)")
    assert run("worker", "--drain", "--debug-kinds")[0] == 0
    code, out, _ = run("dead", "list", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["reason"] for r in rows] == ["exhausted", "exhausted"]
    code, out, _ = run("dead", "show", "1")
    assert code == 0 and "debug.fail always fails" in out and "sk-123" not in out and "***" in out
    code, out, _ = run("dead", "show", "1", "--json")
    assert json.loads(out)["history"][0]["outcome"] == "dead"
    assert run("dead", "show", "999")[0] == 3
    code, out, _ = run("dead", "retry", "1", "999")
    assert code == 5 and "1 dead jobs back in the queue; 1 skipped:" in out and "job 999: not a dead job" in out
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1
    assert run("dead", "retry")[0] == 2
    code, out, _ = run("dead", "retry", "--all", "--json")
    assert code == 0 and json.loads(out)["retried"] == [2]
    assert run("worker", "--drain", "--debug-kinds")[0] == 0
    code, _, err = run("dead", "purge")
    assert code == 2 and "--yes" in err
    code, out, _ = run("dead", "purge", "--older-than", "1d", "--yes")
    assert code == 0 and "purged 0" in out
    code, out, _ = run("dead", "purge", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"purged": 2}


def test_queues_commands(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    assert run("queues", "create", "mail")[0] == 0
    assert run("queues", "pause", "mail")[0] == 0
    assert scalar(db_url, "SELECT paused FROM dispatch.queues WHERE name = 'mail'") is True
    assert run("queues", "resume", "mail")[0] == 0
    code, _, _ = run("queues", "set", "mail", "--max-attempts", "7", "--backoff-base", "2s",
                     "--job-timeout", "1m", "--concurrency", "4", "--dedupe-window", "1d")
    assert code == 0
    code, out, _ = run("queues", "list", "--json")
    mail = next(q for q in json.loads(out) if q["name"] == "mail")
    assert (mail["max_attempts"], mail["backoff_base"], mail["job_timeout"], mail["concurrency"],
            mail["dedupe_window"], mail["paused"]) == (7, 2.0, 60.0, 4, 86400.0, False)
    assert run("queues", "set", "mail", "--concurrency", "0")[0] == 0
    assert scalar(db_url, "SELECT concurrency FROM dispatch.queues WHERE name = 'mail'") is None
    assert run("queues", "pause", "nope")[0] == 3
    assert run("queues", "set", "mail")[0] == 2
    code, _, err = run("queues", "set", "mail", "--backoff-jitter", "5")
    assert code == 2 and "queue_backoff_jitter_fraction" in err
    assert run("queues", "create", "Bad Name")[0] == 2


def test_no_database_is_exit_code_4(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert cli.main(["status"]) == 4
    assert "database unavailable" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", "this is not a url")
    assert cli.main(["status"]) == 2


def test_migrate_and_embedded_server_without_database_url(tmp_path: Path) -> None:
    """A fresh machine: no DATABASE_URL, the project starts its own PostgreSQL."""
    home = Path("/tmp") / f"pgd-home-{os.getpid()}"  # short: the socket lives under it
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(PGDISPATCH_HOME=str(home), PGDISPATCH_LOG="WARNING")

    def cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        result = cmd("migrate")
        assert result.returncode == 0, result.stderr
        assert "embedded PostgreSQL" in result.stdout
        assert cmd("enqueue", "debug.noop").returncode == 0
        result = cmd("worker", "--drain", "--debug-kinds")
        assert result.returncode == 0 and "psql" in result.stderr
        assert cmd("embedded", "url").stdout.startswith("postgresql://")
        assert '"available": 0' in cmd("status", "--json").stdout
    finally:
        assert "stopped" in cmd("embedded", "stop").stdout
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def test_show_prints_long_errors_whole_and_delivered_requests_say_what_was_sent(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    long_error = "upstream said: " + "x" * 300 + " END"
    execute(db_url, "SELECT dispatch.enqueue('debug.fail', jsonb_build_object('error', %s::text), max_attempts => 1)", (long_error,))
    assert run("worker", "--drain", "--debug-kinds")[0] == 0
    code, out, _ = run("dead", "show", "1")
    assert code == 0 and long_error in out  # not cut to a table cell
    # A delivered request: the job row is gone, its attempt keeps what was sent (masked).
    execute(db_url, """INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, outcome, status, detail)
                       VALUES (7, 1, 'requests', 'http.request', 'completed', 200,
                               '{"request": {"method": "POST", "uri": "https://crm.example/x?token=***"}}')""")
    code, out, _ = run("request", "show", "7", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["state"] == "delivered"
    assert shown["args"] == {"method": "POST", "uri": "https://crm.example/x?token=***"}


def test_a_worker_with_no_schema_says_to_migrate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], empty_db_url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", empty_db_url)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run: pgdispatch migrate" in err
