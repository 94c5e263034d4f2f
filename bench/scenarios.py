"""Benchmark scenarios of pgdispatch itself, each on a fresh database of the given server.

Figures are measured, never asserted: see README "Performance". The peers' side (pgqueuer,
procrastinate) is not here yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from db.schema import migrate

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"pgd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@contextlib.contextmanager
def sink(status: int = 202, delay: float = 0.0) -> Iterator[str]:
    """The raw asyncio sink (bench/sink.py) in its own process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.sink", "--port", str(port), "--status",
                             str(status), "--delay", str(delay)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "sink listening ..."
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def run_worker(url: str, *args: str) -> float:
    """Run `cli.py worker` to completion; returns wall seconds."""
    env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "worker", *args], env=env, check=True)
    return time.perf_counter() - started


def drain(server_url: str, *, jobs: int = 50_000, processes: int = 1) -> dict[str, Any]:
    with fresh_database(server_url) as url:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, %s)",
                      (jobs,))
            c.execute("VACUUM ANALYZE dispatch.jobs")
        seconds = run_worker(url, "--drain", "--processes", str(processes))
        first, last = _history_span(url)
    return {"scenario": "drain", "jobs": jobs, "processes": processes,
            "wall_seconds": round(seconds, 2), "jobs_per_second": round(jobs / (last - first)),
            "note": "rate between the first and last completion (process start excluded)"}


def deliver(server_url: str, *, requests: int = 20_000, concurrency: int = 200) -> dict[str, Any]:
    with fresh_database(server_url) as url, sink(202) as target:
        ceiling = asyncio.run(_bare_client(f"{target}/bare", requests, concurrency))
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("""SELECT dispatch.send_request('POST', %s || '/r/' || i, 'payload',
                                                      success_code => 202)
                         FROM generate_series(1, %s) i""", (target, requests))
        seconds = run_worker(url, "--drain", "--queue", "requests", "--concurrency", str(concurrency),
                             "--per-host-limit", str(concurrency), "--allow-private-networks")
        first, last = _history_span(url)
        with psycopg.connect(url) as c:
            delivered = c.execute(
                "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'").fetchone()
    rate = requests / (last - first)
    return {"scenario": "deliver", "requests": requests, "delivered": delivered[0] if delivered else 0,
            "wall_seconds": round(seconds, 2), "deliveries_per_second": round(rate),
            "bare_client_per_second": round(ceiling), "ratio_to_bare_client": round(rate / ceiling, 2)}


def latency(server_url: str, *, rate: int = 100, seconds: float = 10.0,
            requests: bool = False) -> dict[str, Any]:
    """A steady trickle of single-row inserts into an idle pool: insert→start and insert→done.
    With `requests`, each insert is a dispatch.send_request to the local sink (insert→delivery)."""
    with fresh_database(server_url) as url, sink(202) as target:
        env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"}
        worker = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker",
                                   "--poll-interval", "5s", "--queue", "default",
                                   "--queue", "requests", "--allow-private-networks"], env=env)
        # now() is the inserting transaction's start: exactly the job's created_at.
        insert = ("SELECT dispatch.send_request('POST', %(target)s, 'x', success_code => 202), "
                  "extract(epoch FROM now())"
                  if requests else
                  "INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop') "
                  "RETURNING id, extract(epoch FROM created_at)")
        created: dict[int, float] = {}
        try:
            time.sleep(3)  # started and idle
            with psycopg.connect(url, autocommit=True) as c:
                start = time.perf_counter()
                for i in range(int(rate * seconds)):
                    row = c.execute(insert, {"target": f"{target}/latency"}).fetchone()
                    assert row is not None
                    created[row[0]] = float(row[1])
                    time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
            time.sleep(1)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        with psycopg.connect(url) as c:
            rows = c.execute("SELECT job_id, extract(epoch FROM started_at), extract(epoch FROM finished_at) "
                             "FROM dispatch.job_history WHERE outcome = 'completed'").fetchall()
    to_start = sorted((float(s) - created[j]) * 1000 for j, s, _ in rows)
    to_done = sorted((float(f) - created[j]) * 1000 for j, _, f in rows)
    return {"scenario": "latency", "kind": "http.request" if requests else "debug.noop",
            "rate_per_second": rate, "jobs": len(created), "completed": len(rows),
            "insert_to_start_ms": _summary(to_start), "insert_to_done_ms": _summary(to_done)}


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "max": round(values[-1], 2)}


def _history_span(url: str) -> tuple[float, float]:
    with psycopg.connect(url) as c:
        row = c.execute("""SELECT extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at))
                           FROM dispatch.job_history""").fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


async def _bare_client(url: str, requests: int, concurrency: int) -> float:
    """The same HTTP client the workers use, posting straight to the sink: the ceiling."""
    from worker.process import http_client

    async with http_client(max_connections=concurrency) as client:
        queue = iter(range(requests))

        async def one_lane() -> None:
            for _ in queue:
                response = await client.post(url, content=b'{"request":"payload"}')
                assert response.status_code == 202

        started = time.perf_counter()
        await asyncio.gather(*(one_lane() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
