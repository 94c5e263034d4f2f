"""Benchmark scenarios, each on a fresh database of the given server, for pgdispatch and, where
the issue asks for it, for a peer (bench/peers.py) measured the same way.

Every rate is taken between the first job's start and the last job's end, so process start-up
and shutdown count for nobody. Figures are measured, never asserted: see README "Performance".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import psycopg
from psycopg import sql as pgsql

from pgdispatch.bench.cost import CostMeter, RoundTrips
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


@dataclasses.dataclass
class Drained:
    """A drain: the jobs it finished, the window from the first start to the last end (wall
    clock), and what they cost (bench/cost.py)."""

    done: int
    first_started: float
    last_done: float
    cost: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.done / (self.last_done - self.first_started)


def _our_drain(url: str, *worker_args: str, history: str = "dispatch.job_history WHERE job_id > 0",
               outcome: str = "outcome = 'completed'") -> Drained:
    """Drain with `pgdispatch worker --drain`; the window from `history` (job_id > 0: the
    backlog scenario's planted history rows have negative ids)."""
    with CostMeter(url) as meter:
        worker = _our_worker(url, "--drain", *worker_args)
        meter.watch(worker.pid)
        if worker.wait() != 0:
            raise RuntimeError("pgdispatch worker failed")
    with psycopg.connect(url) as c:
        row = c.execute(f"""SELECT count(*) FILTER (WHERE {outcome}), extract(epoch FROM min(started_at)),
                                   extract(epoch FROM max(finished_at))
                            FROM {history}""").fetchone()
    assert row is not None
    done, t0, t1 = int(row[0]), float(row[1]), float(row[2])
    return Drained(done, t0, t1, meter.cost(t0, t1, done))


def _our_drain_rate(url: str, *worker_args: str) -> tuple[int, float]:
    drained = _our_drain(url, *worker_args)
    return drained.done, drained.rate


def round_trips(server_url: str, fill: Callable[[str], None], drain: Callable[[str], Drained], *,
                ours: bool = True) -> float:
    """Round trips per finished job on a pass of its own through the counting proxy: `fill`
    gets the direct URL, `drain` the proxy's."""
    with fresh_database(server_url, ours=ours) as url:
        fill(url)
        with RoundTrips(url) as proxy:
            drained = drain(proxy.url)
    return round(proxy.count / max(drained.done, 1), 2)


# -- peers ----------------------------------------------------------------------------------------

def _peer(system: str, command: str, url: str, *args: str) -> Result:
    out = subprocess.run([*PEERS, system, command, "--url", url, *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{system} {command} failed: {out.stderr.strip().splitlines()[-1:]}")
    result: Result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _peer_drain(system: str, url: str, processes: int, *args: str) -> Drained:
    with CostMeter(url) as meter:
        procs = [subprocess.Popen([*PEERS, system, "drain", "--url", url, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for _ in range(processes)]
        for proc in procs:
            meter.watch(proc.pid)
        results = []
        for proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"{system} drain exited with {proc.returncode}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    done = sum(r["done"] - r["failed"] for r in results)
    first = min(r["first_started"] for r in results if r["done"])
    last = max(r["last_done"] for r in results)
    return Drained(done, first, last, meter.cost(first, last, done))


# -- scenarios ------------------------------------------------------------------------------------

def drain(server_url: str, system: str = OURS, *, jobs: int = 50_000, processes: int = 1,
          worker_args: tuple[str, ...] = (), trips: bool = True) -> Result:
    """No-op jobs drained with the worker's defaults (as a user runs it) or `worker_args`; the
    peers at their best batch. Cost from the measured pass, round trips from one of their own
    on a fifth of the jobs."""
    def fill(url: str, n: int = jobs) -> None:
        if system == OURS:
            _queue_noops(url, n)
        else:
            _peer(system, "fill", url, "--jobs", str(n))

    def run(url: str) -> Drained:
        if system == OURS:
            return _our_drain(url, "--processes", str(processes), *worker_args)
        return _peer_drain(system, url, processes, "--scenario", "drain")

    with fresh_database(server_url, ours=system == OURS) as url:
        fill(url)
        drained = run(url)
    per_job = round_trips(server_url, lambda url: fill(url, max(jobs // 5, 1)), run,
                          ours=system == OURS) if trips else None
    return {"scenario": f"drain, {processes} process{'es' if processes > 1 else ''}", "system": system,
            "unit": "jobs/s", "value": round(drained.rate), "jobs": jobs, "completed": drained.done,
            **drained.cost, "round_trips": per_job}


def deliver(server_url: str, system: str = OURS, *, requests: int = 20_000,
            concurrency: int = 200, worker_args: tuple[str, ...] = (), trips: bool = True) -> Result:
    """One POST per job to the local sink, with the worker's defaults or `worker_args`; the bare
    transport at `concurrency` lanes is the ceiling."""
    with sink(202) as target:
        def fill(url: str, n: int = requests) -> None:
            if system == OURS:
                with psycopg.connect(url, autocommit=True) as c:
                    c.execute("""SELECT dispatch.send_request('POST', %s || '/r/' || i, 'payload',
                                                              success_code => 202)
                                 FROM generate_series(1, %s) i""", (target, n))
            else:
                _peer(system, "fill", url, "--jobs", str(n))

        def run(url: str) -> Drained:
            if system == OURS:
                return _our_drain(url, "--queue", "requests", "--allow-private-networks", *worker_args)
            return _peer_drain(system, url, 1, "--scenario", "deliver", "--target", f"{target}/r")

        if system == BARE_CLIENT:
            started = time.time()
            cpu = time.process_time()
            rate = asyncio.run(_bare_client(f"{target}/bare", requests, concurrency))
            return {"scenario": "deliver", "system": system, "unit": "deliveries/s", "value": round(rate),
                    "requests": requests, "completed": requests,
                    "worker_cpu_us": round((time.process_time() - cpu) * 1e6 / requests, 1),
                    "seconds": round(time.time() - started, 2)}
        with fresh_database(server_url, ours=system == OURS) as url:
            fill(url)
            drained = run(url)
        per_job = round_trips(server_url, lambda url: fill(url, max(requests // 5, 1)), run,
                              ours=system == OURS) if trips else None
    return {"scenario": "deliver", "system": system, "unit": "deliveries/s", "value": round(drained.rate),
            "requests": requests, "completed": drained.done, **drained.cost, "round_trips": per_job}


# The settings the sweep compares with the defaults (200 slots, claims of 100, 64 requests in
# flight per host): slots per process, most jobs per claim, requests in flight per host.
SWEEP_DRAIN = {"500 slots, claims of 500": ("--concurrency", "500", "--batch", "500"),
               "1000 slots, claims of 1000": ("--concurrency", "1000", "--batch", "1000")}
SWEEP_DELIVER = {"200 slots, 200 a host": ("--concurrency", "200", "--per-host-limit", "200"),
                 "500 slots, 500 a host, claims of 500": ("--concurrency", "500", "--batch", "500",
                                                          "--per-host-limit", "500")}


def sweep(server_url: str, *, sizes: tuple[int, ...] = (1_000, 10_000, 100_000)) -> list[Result]:
    """The defaults beside tuned settings, at each backlog size, for no-op jobs and deliveries;
    each row says what share of the best rate of its group it reached."""
    def measure(kind: str, n: int, args: tuple[str, ...]) -> Result:
        if kind == "no-op":
            return drain(server_url, jobs=n, worker_args=args, trips=False)
        return deliver(server_url, requests=n, worker_args=args, trips=False)

    results: list[Result] = []
    for kind, settings in (("no-op", SWEEP_DRAIN), ("delivery", SWEEP_DELIVER)):
        for n in sizes if kind == "no-op" else sizes[:2]:
            group = []
            for label, args in {"defaults": (), **settings}.items():
                result = measure(kind, n, args)
                result["scenario"] = f"sweep: {kind}, {n:,} queued, {label}"
                group.append(result)
            best = max(r["value"] for r in group)
            for result in group:
                result["share_of_best"] = round(result["value"] / best, 2)
            results += group
    return results


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


def _our_latency(url: str, rate: int, seconds: float, backlog: int = 0) -> list[tuple[float, float]]:
    worker = _our_worker(url, "--poll-interval", "5s")
    created: dict[int, float] = {}
    try:
        time.sleep(3)  # started and idle
        with psycopg.connect(url, autocommit=True) as c:
            if backlog:  # draining on a queue of its own while the trickle runs
                c.execute("INSERT INTO dispatch.queues (name) VALUES ('bulk')")
                c.execute("INSERT INTO dispatch.jobs (queue, kind) SELECT 'bulk', 'debug.noop' "
                          "FROM generate_series(1, %s)", (backlog,))
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                # created_at is the inserting transaction's start, before its commit.
                row = c.execute("INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop') "
                                "RETURNING id, extract(epoch FROM created_at)").fetchone()
                assert row is not None
                created[row[0]] = float(row[1])
                time.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
            left = c.execute("SELECT count(*) FROM dispatch.jobs WHERE queue = 'bulk'").fetchone()
            if backlog and left is not None and left[0] == 0:
                raise RuntimeError("the backlog drained before the trickle ended: make it larger")
        time.sleep(1)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT job_id, extract(epoch FROM started_at), extract(epoch FROM finished_at) "
                         "FROM dispatch.job_history "
                         "WHERE outcome = 'completed' AND queue = 'default'").fetchall()
    return [(float(s) - created[j], float(f) - created[j]) for j, s, f in rows]


def latency_beside_backlog(server_url: str, *, rate: int = 1000, seconds: float = 5.0,
                           backlog: int = 300_000) -> Result:
    """Single-row inserts at `rate` into one queue while a backlog drains on another, one worker
    with its defaults serving both."""
    with fresh_database(server_url) as url:
        samples = _our_latency(url, rate, seconds, backlog=backlog)
    return {"scenario": f"latency at {rate:,}/s beside a {backlog:,} backlog", "system": OURS, "unit": "ms",
            "rate_per_second": rate, "jobs": int(rate * seconds), "completed": len(samples),
            "insert_to_start_ms": summary(sorted(s * 1000 for s, _ in samples)),
            "insert_to_done_ms": summary(sorted(d * 1000 for _, d in samples))}


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
