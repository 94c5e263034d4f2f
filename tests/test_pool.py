"""The worker pool as an operator runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.helpers import execute, scalar, wait_for

ROOT = Path(__file__).resolve().parent.parent


def start_worker(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--debug-kinds", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen[str], *, expect: int = 0, timeout: float = 60) -> str:
    """Wait for a worker process to end; assert its exit code; return what it printed."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_drain_with_two_processes_exits_zero_when_done(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 2000)")
    proc = start_worker(db_url, "--drain", "--processes", "2")
    finished(proc, timeout=60)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    assert scalar(db_url, "SELECT count(DISTINCT worker) FROM dispatch.job_history") >= 1


def test_sigterm_finishes_running_jobs_and_loses_nothing(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.sleep', '{\"seconds\": 1}' FROM generate_series(1, 30)")
    proc = start_worker(db_url, "--concurrency", "10", "--grace", "10s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 10)
    proc.send_signal(signal.SIGTERM)
    finished(proc, timeout=30)
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM dispatch.jobs WHERE state = 'running'").fetchone() == (0,)
        completed = c.execute("SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'").fetchone()
        left = c.execute("SELECT count(*) FROM dispatch.jobs WHERE state = 'available' AND attempt = 0").fetchone()
    assert completed is not None and left is not None
    assert completed[0] >= 10 and completed[0] + left[0] == 30


def test_sigterm_past_grace_releases_jobs_without_counting_the_attempt(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.sleep', '{\"seconds\": 60}' FROM generate_series(1, 4)")
    proc = start_worker(db_url, "--grace", "0.5s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 4)
    proc.send_signal(signal.SIGTERM)
    finished(proc, timeout=30)
    rows = psycopg.connect(db_url).execute("SELECT state::text, attempt FROM dispatch.jobs").fetchall()
    assert rows == [("available", 0)] * 4


@pytest.mark.chaos
def test_kill_9_mid_job_is_rescued_and_completed_without_manual_steps(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.sleep', '{\"seconds\": 0.5}' FROM generate_series(1, 40)")
    victim = start_worker(db_url, "--concurrency", "20", "--lease", "2s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") >= 10)
    # The pool's child is the one holding leases: kill the whole process group hard.
    for pid in psycopg.connect(db_url).execute("SELECT pid FROM dispatch.workers").fetchall():
        os.kill(pid[0], signal.SIGKILL)
    victim.kill()
    victim.communicate(timeout=10)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") > 0
    # The dead worker's leases run out; the next worker rescues them by itself and finishes all.
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE lease_expires_at > now()") == 0, 10)
    # Rescued attempts back off like retries (the queue's backoff): a worker, not a drain,
    # waits for them to come due.
    rescuer = start_worker(db_url, "--lease", "2s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 60)
    rescuer.send_signal(signal.SIGTERM)
    finished(rescuer, timeout=30)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'rescued'") > 0
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 40


@pytest.mark.chaos
def test_pool_restarts_a_crashed_child_and_serves_ops_http(db_url: str) -> None:
    port = free_port()
    proc = start_worker(db_url, "--processes", "2", "--http-port", str(port), "--grace", "1s")
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers WHERE stopped_at IS NULL") == 2)
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5))
        assert health["status"] == "ok" and health["pool"]["alive"] == 2
        pids = [r[0] for r in psycopg.connect(db_url).execute("SELECT pid FROM dispatch.workers").fetchall()]
        os.kill(pids[0], signal.SIGKILL)
        # The restarted child registers first and publishes its figures with its first
        # heartbeat, once LISTEN is up: wait for both.
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers WHERE stopped_at IS NULL"
                                " AND pid <> %s AND stats ? 'signing_key_cache'", (pids[0],)) >= 2)
        stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5))
        assert stats["pool"]["restarts"] == 1
        assert "default" in [q["queue"] for q in stats["queues"]]
        # Per-process figures, published with each heartbeat.
        alive = [w for w in stats["workers"] if w["status"] == "alive" and w["pid"] != pids[0]]
        assert len(alive) == 2 and all("signing_key_cache" in w["stats"] for w in alive)
        execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 10)")
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
        assert all(w["stats"]["limits"]["rules"] == 0 for w in alive)
        execute(db_url, "INSERT INTO dispatch.limits (key, rate) VALUES ('host:api.example.com', 5)")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'pgdispatch_jobs{queue="default",state="available"} 0.0' in metrics
        # This pool's attempts, summed over its processes (the killed one's too), by queue and
        # kind; durations as a histogram; no label that a restart changes (a pid, a worker id).
        assert 'pgdispatch_attempts_total{kind="debug.noop",outcome="completed",queue="default"} 10.0' in metrics
        assert 'pgdispatch_job_duration_seconds_bucket{kind="debug.noop",le="0.005",queue="default"}' in metrics
        assert 'pgdispatch_job_duration_seconds_count{kind="debug.noop",queue="default"} 10.0' in metrics
        assert not any(str(pid) in line for pid in pids for line in metrics.splitlines() if line.startswith("pgdispatch"))
        assert "pgdispatch_workers{" in metrics and 'status="alive"' in metrics
        assert 'pgdispatch_limit_in_flight{key="host:api.example.com"} 0.0' in metrics
        assert 'pgdispatch_limit_blocked{key="host:api.example.com",why="breaker"} 0.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        finished(proc, timeout=30)


def test_a_busy_http_port_is_one_line_and_exit_2(db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = finished(start_worker(db_url, "--http-port", str(taken.getsockname()[1])), expect=2)
    assert out.strip().startswith("error: --http-port") and "Traceback" not in out, out
    assert scalar(db_url, "SELECT count(*) FROM dispatch.workers") == 0  # no child was started


def test_mistakes_are_one_line_with_a_documented_exit_code(db_url: str) -> None:
    for args, code, says in ((["--processes", "0"], 2, "--processes: must be at least 1"),
                             (["--http-port", "99999"], 2, "a port is 1-65535"),
                             (["--lease", "soon"], 2, "not a duration")):
        out = finished(start_worker(db_url, *args), expect=code)
        assert len(out.strip().splitlines()) == 1 and says in out, out
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
           "PGDISPATCH_LOG": "WARNING"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "worker"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4 and proc.stderr.startswith("error: database unavailable"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.chaos
def test_a_second_sigterm_releases_running_jobs_at_once(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.sleep', '{\"seconds\": 600}' FROM generate_series(1, 3)")
    proc = start_worker(db_url, "--grace", "600s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    said = proc.stdout.readline()  # the pool says what it does: no silent grace period
    assert "signal again to release them now" in said, said
    proc.send_signal(signal.SIGTERM)
    finished(proc, timeout=30)  # not 600 s
    assert psycopg.connect(db_url).execute("SELECT state::text, attempt FROM dispatch.jobs").fetchall() == [("available", 0)] * 3


def test_time_limit_stops_the_pool_cleanly(db_url: str) -> None:
    # A job that outlives the limit shows the worker was up and working when the limit came
    # (a limit shorter than a loaded machine's start-up stopped the child before it registered).
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('debug.sleep', '{\"seconds\": 600}')")
    proc = start_worker(db_url, "--time-limit", "6s", "--grace", "1s")
    wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'running'") == 1)
    finished(proc, timeout=30)  # by itself, exit code 0
    assert psycopg.connect(db_url).execute(
        "SELECT count(*) FILTER (WHERE stopped_at IS NOT NULL), count(*) FROM dispatch.workers").fetchone() == (1, 1)
    assert psycopg.connect(db_url).execute("SELECT state::text, attempt FROM dispatch.jobs").fetchone() == ("available", 0)


def test_exit_on_newer_propagates_exit_code_10(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind, version) VALUES ('debug.noop', 99)")
    proc = start_worker(db_url, "--exit-on-newer", "--lease", "1s")
    finished(proc, expect=10, timeout=30)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1


def test_memory_limit_recycles_the_process_and_keeps_working(db_url: str) -> None:
    proc = start_worker(db_url, "--memory-limit", "1", "--lease", "1s", "--grace", "1s")
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers WHERE stopped_at IS NOT NULL") >= 1, 30)
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers") >= 2, 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = finished(proc, timeout=30)
    assert "memory limit 1 MiB reached" in out
