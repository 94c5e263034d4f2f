"""Benchmark scenarios, each on a fresh database of the given server, for pgdispatch and, where
the issue asks for it, for a peer (bench/peers.py) measured the same way.

Every rate is taken between the first job's start and the last job's end, so process start-up
and shutdown count for nobody. Figures are measured, never asserted: see README "Performance".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psutil
import psycopg
from psycopg import sql as pgsql

from pgdispatch.db.schema import migrate

PEERS = (sys.executable, "-m", "pgdispatch.bench.peers")  # each peer in a process of its own
OURS = "pgdispatch"
BARE_CLIENT = "bare client"
Result = dict[str, Any]
# Our best drain setting from the same kind of sweep the peers got (100, 200, 500, 1000):
# 500 slots claimed 500 at a time. The peers' settings are in bench/peers.py BEST.
OUR_DRAIN = ("--concurrency", "500", "--batch", "500")


@contextlib.contextmanager
def fresh_database(server_url: str, *, ours: bool = True) -> Iterator[str]:
    name = f"pgd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(server_url, dbname=name)
    try:
        if ours:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@contextlib.contextmanager
def sink(status: int = 202, delay: float = 0.0, record: str | None = None) -> Iterator[str]:
    """The raw asyncio sink (bench/sink.py) in its own process; `record`: where it writes its
    arrival times when it stops."""
    with local_server("pgdispatch.bench.sink", "--status", str(status), "--delay", str(delay),
                      *(["--record", record] if record else [])) as url:
        yield url


@contextlib.contextmanager
def local_server(module: str, *args: str) -> Iterator[str]:
    """`python -m module --port P *args` in its own process, until the block ends (SIGTERM).
    The server prints one line when it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # "... listening ..."
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# -- pgdispatch -----------------------------------------------------------------------------------

def _our_worker(url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--debug-kinds", *args], env=env)


def _queue_noops(url: str, jobs: int) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, %s)", (jobs,))
        c.execute("VACUUM ANALYZE dispatch.jobs")


def _our_drain_rate(url: str, *worker_args: str) -> tuple[int, float]:
    """Drain with `cli.py worker --drain`; completed jobs and their rate from job_history."""
    if _our_worker(url, "--drain", *worker_args).wait() != 0:
        raise RuntimeError("pgdispatch worker failed")
    with psycopg.connect(url) as c:
        # job_id > 0: the backlog scenario's planted history rows have negative ids.
        row = c.execute("""SELECT count(*) FILTER (WHERE outcome = 'completed'),
                                  extract(epoch FROM max(finished_at) - min(started_at))
                           FROM dispatch.job_history WHERE job_id > 0""").fetchone()
    assert row is not None
    return int(row[0]), int(row[0]) / float(row[1])


# -- peers ----------------------------------------------------------------------------------------

def _peer(system: str, command: str, url: str, *args: str) -> Result:
    out = subprocess.run([*PEERS, system, command, "--url", url, *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{system} {command} failed: {out.stderr.strip().splitlines()[-1:]}")
    result: Result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _peer_drain_rate(system: str, url: str, processes: int, *args: str) -> tuple[int, float]:
    procs = [subprocess.Popen([*PEERS, system, "drain", "--url", url, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(processes)]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{system} drain exited with {proc.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    done = sum(r["done"] - r["failed"] for r in results)
    first = min(r["first_started"] for r in results if r["done"])
    last = max(r["last_done"] for r in results)
    return done, done / (last - first)


# -- scenarios ------------------------------------------------------------------------------------

def drain(server_url: str, system: str = OURS, *, jobs: int = 50_000, processes: int = 1) -> Result:
    with fresh_database(server_url, ours=system == OURS) as url:
        if system == OURS:
            _queue_noops(url, jobs)
            done, rate = _our_drain_rate(url, "--processes", str(processes), *OUR_DRAIN)
        else:
            _peer(system, "fill", url, "--jobs", str(jobs))
            done, rate = _peer_drain_rate(system, url, processes, "--scenario", "drain")
    return {"scenario": f"drain, {processes} process{'es' if processes > 1 else ''}", "system": system,
            "unit": "jobs/s", "value": round(rate), "jobs": jobs, "completed": done}


def deliver(server_url: str, system: str = OURS, *, requests: int = 20_000,
            concurrency: int = 200) -> Result:
    with fresh_database(server_url, ours=system == OURS) as url, sink(202) as target:
        if system == BARE_CLIENT:
            done, rate = requests, asyncio.run(_bare_client(f"{target}/bare", requests, concurrency))
        elif system == OURS:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute("""SELECT dispatch.send_request('POST', %s || '/r/' || i, 'payload',
                                                          success_code => 202)
                             FROM generate_series(1, %s) i""", (target, requests))
            done, rate = _our_drain_rate(url, "--queue", "requests", "--concurrency", str(concurrency),
                                         "--per-host-limit", str(concurrency), "--allow-private-networks")
        else:
            _peer(system, "fill", url, "--jobs", str(requests))
            done, rate = _peer_drain_rate(system, url, 1, "--scenario", "deliver", "--target", f"{target}/r")
    return {"scenario": "deliver", "system": system, "unit": "deliveries/s", "value": round(rate),
            "requests": requests, "completed": done}


async def _bare_client(url: str, requests: int, concurrency: int) -> float:
    """The same HTTP transport the workers use, posting straight to the sink: the ceiling."""
    from pgdispatch.worker.outbound.transport import HttpTransport

    async with HttpTransport(max_connections=concurrency) as http:
        queue = iter(range(requests))

        async def one_lane() -> None:
            for _ in queue:
                async with http.exchange("POST", url, content=b'{"request":"payload"}') as response:
                    await response.aread()
                assert response.status_code == 202

        started = time.perf_counter()
        await asyncio.gather(*(one_lane() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def latency(server_url: str, system: str = OURS, *, rate: int = 100, seconds: float = 10.0) -> Result:
    """A steady trickle of single-row inserts into an idle worker: insert→start, insert→done."""
    with fresh_database(server_url, ours=system == OURS) as url:
        if system == OURS:
            samples = _our_latency(url, rate, seconds)
        else:
            samples = _peer_latency(system, url, rate, seconds)
    to_start = sorted(s * 1000 for s, _ in samples)
    to_done = sorted(d * 1000 for _, d in samples)
    return {"scenario": "latency", "system": system, "unit": "ms", "rate_per_second": rate,
            "jobs": int(rate * seconds), "completed": len(samples),
            "insert_to_start_ms": summary(to_start), "insert_to_done_ms": summary(to_done)}


def _our_latency(url: str, rate: int, seconds: float) -> list[tuple[float, float]]:
    worker = _our_worker(url, "--poll-interval", "5s")
    created: dict[int, float] = {}
    try:
        time.sleep(3)  # started and idle
        with psycopg.connect(url, autocommit=True) as c:
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                # created_at is the inserting transaction's start, before its commit.
                row = c.execute("INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop') "
                                "RETURNING id, extract(epoch FROM created_at)").fetchone()
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
    return [(float(s) - created[j], float(f) - created[j]) for j, s, f in rows]


def _peer_latency(system: str, url: str, rate: int, seconds: float) -> list[tuple[float, float]]:
    _peer(system, "install", url)
    server = subprocess.Popen([*PEERS, system, "serve", "--url", url,
                               "--scenario", "latency"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    try:
        server.stdout.readline()  # "ready"
        time.sleep(3)
        _peer(system, "produce", url, "--rate", str(rate), "--seconds", str(seconds))
        time.sleep(1)
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, _ = server.communicate(timeout=60)
    return [tuple(pair) for pair in json.loads(stdout.strip().splitlines()[-1])["latencies"]]


def backlog(server_url: str, *, small: int = 10_000, large: int = 1_000_000,
            history: int = 5_000_000) -> list[Result]:
    """Drain rate with a small queue, a huge queue, and a small queue beside a huge history."""
    results = []
    for queued, history_rows, label in ((small, 0, f"{small:,} queued"), (large, 0, f"{large:,} queued"),
                                        (small, history, f"{small:,} queued, {history:,} history rows")):
        with fresh_database(server_url) as url:
            if history_rows:
                with psycopg.connect(url, autocommit=True) as c:
                    c.execute("""INSERT INTO dispatch.job_history
                                     (job_id, attempt, queue, kind, outcome, started_at, finished_at)
                                 SELECT -i, 1, 'default', 'debug.noop', 'completed',
                                        now() - interval '1 hour', now() - interval '1 hour'
                                 FROM generate_series(1, %s) i""", (history_rows,))
                    c.execute("ANALYZE dispatch.job_history")
            _queue_noops(url, queued)
            done, rate = _our_drain_rate(url, *OUR_DRAIN)
        results.append({"scenario": f"backlog: {label}", "system": OURS, "unit": "jobs/s",
                        "value": round(rate), "completed": done})
    return results


def memory(server_url: str, *, in_flight: int = 256, delay: float = 2.0) -> Result:
    """Peak RSS of a worker process holding `in_flight` requests open against a slow sink."""
    requests = in_flight * 4
    with fresh_database(server_url) as url, sink(202, delay=delay) as target:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("""SELECT dispatch.send_request('POST', %s || '/slow/' || i, repeat('x', 1024),
                                                      success_code => 202)
                         FROM generate_series(1, %s) i""", (target, requests))
        worker = _our_worker(url, "--drain", "--queue", "requests", "--concurrency", str(in_flight),
                             "--per-host-limit", str(in_flight), "--allow-private-networks")
        peak = 0
        parent = psutil.Process(worker.pid)
        while worker.poll() is None:
            with contextlib.suppress(psutil.Error):
                for proc in [parent, *parent.children(recursive=True)]:
                    peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
        with psycopg.connect(url) as c:
            row = c.execute("SELECT count(*) FROM dispatch.job_history "
                            "WHERE outcome = 'completed'").fetchone()
    return {"scenario": f"memory: peak RSS, {in_flight} in flight", "system": OURS, "unit": "MB",
            "value": round(peak / 2**20, 1), "completed": row[0] if row else 0, "requests": requests}


def enqueue(server_url: str, *, seconds: float = 5.0, rows_per_statement: int = 1000) -> list[Result]:
    """Producer-side rates through the SQL API, the NOTIFY trigger included."""
    results = []
    with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as c:
        for label, statement, params, rows in (
            ("single-row INSERT", "INSERT INTO dispatch.jobs (kind, args) VALUES ('debug.noop', %s)",
             ('{"n": 1}',), 1),
            ("single-row dispatch.enqueue()", "SELECT dispatch.enqueue('debug.noop', %s)", ('{"n": 1}',), 1),
            (f"{rows_per_statement}-row INSERT",
             "INSERT INTO dispatch.jobs (kind, args) SELECT 'debug.noop', a FROM unnest(%s::jsonb[]) a",
             (['{"n": 1}'] * rows_per_statement,), rows_per_statement),
        ):
            inserted = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                c.execute(statement, params)
                inserted += rows
            rate = inserted / (time.perf_counter() - started)
            results.append({"scenario": f"enqueue: {label}", "system": OURS, "unit": "rows/s",
                            "value": round(rate)})
            c.execute("TRUNCATE dispatch.jobs")
    return results


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "max": round(values[-1], 2)}


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]
