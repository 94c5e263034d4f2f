"""The shared-limits scenario (`pgdispatch bench --scenario limits`): two worker processes, one
destination, limits counted where they matter, at the receiving server.

- rate: 4,000 requests, a rule of 200 requests/s for the host: the rate the sink saw after the
  first burst (the bucket's size), and how many jobs went back to the queue;
- cap: 1,000 requests answered in 50 ms, a rule of 5 in flight: the most the sink held at once;
- breaker: 2,000 requests to an endpoint answering 503, breaker after 5 failures, cooldown 2 s:
  how long after the opening the other process's requests stopped arriving, and the most
  requests that reached the endpoint in any cooldown after that (one probe each: 1).

`--scenario limits-pools`: 1,000 requests, a rule of 50/s for the host, served by 1, 2 and 3
pools of 2 worker processes each (with their defaults, running until the queue is empty): how
many jobs were put back per delivery (at most one), how often the bucket row was updated per
request (one update per block of tokens: about a fifth at 50/s), the rate the sink saw.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from pgdispatch.bench.scenarios import OURS, Result, _our_worker, fresh_database, sink

PROCESSES = "2"


def limits(server_url: str) -> list[Result]:
    return [_rate(server_url), _cap(server_url), _breaker(server_url)]


def pools(server_url: str) -> list[Result]:
    return [result for n in (1, 2, 3) for result in _pools(server_url, n)]


def _pools(server_url: str, pools: int, *, requests: int = 1000, rate: float = 50.0) -> list[Result]:
    record = _recording()
    with fresh_database(server_url) as url:
        with sink(200, record=record) as target:
            _rule(url, target, rate=rate)
            _send(url, target, requests)
            before = _bucket_updates(url)
            workers = [_our_worker(url, "--queue", "requests", "--processes", PROCESSES,
                                   "--allow-private-networks") for _ in range(pools)]
            try:
                deadline = time.monotonic() + requests / rate * 3 + 60
                while _waiting(url) and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                for worker in workers:
                    worker.terminate()
                for worker in workers:
                    worker.wait(60)
            time.sleep(1.5)  # backends flush their table statistics within a second or so
            updates = _bucket_updates(url) - before
        arrivals = sorted(_read_record(record)["arrivals"])
        with psycopg.connect(url) as conn:
            row = conn.execute("""SELECT count(*) FILTER (WHERE outcome = 'completed'),
                                         count(*) FILTER (WHERE outcome = 'released'),
                                         coalesce(max(n), 0)
                                  FROM dispatch.job_history
                                  LEFT JOIN (SELECT job_id, count(*) AS n FROM dispatch.job_history
                                             WHERE outcome = 'released' GROUP BY job_id) r
                                  USING (job_id)""").fetchone()
        delivered, released, most = row if row else (0, 0, 0)
    name = f"limits: rate {rate:g}/s, {pools} pool{'s' if pools > 1 else ''} × {PROCESSES} processes"
    steady = (len(arrivals) - rate) / (arrivals[-1] - arrivals[0]) if len(arrivals) > rate else 0.0
    common = {"system": OURS, "requests": requests, "delivered": delivered, "released": released,
              "most_put_back": most, "bucket_updates": updates}
    return [
        {"scenario": f"{name}: put back per delivery", "unit": "released / delivered",
         "value": round(released / max(delivered, 1), 3), **common},
        {"scenario": f"{name}: bucket updates per request", "unit": "updates / request",
         "value": round(updates / max(delivered, 1), 3), **common},
        {"scenario": f"{name}: rate at the sink", "unit": "req/s at the sink", "value": round(steady, 1),
         "target": rate, **common},
    ]


def _bucket_updates(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(n_tup_upd, 0) FROM pg_stat_user_tables "
                           "WHERE relid = 'dispatch.limit_state'::regclass").fetchone()
    return int(row[0]) if row else 0


def _waiting(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM dispatch.jobs").fetchone()
    return int(row[0]) if row else 0


def _rate(server_url: str, *, requests: int = 4000, rate: float = 200.0) -> Result:
    burst = int(rate)
    record = _recording()
    with fresh_database(server_url) as url:
        with sink(200, record=record) as target:
            _rule(url, target, rate=rate, burst=burst)
            _send(url, target, requests)
            before = _bucket_updates(url)
            _run_until_done(url)
            time.sleep(1.5)  # backends flush their table statistics within a second or so
            updates = _bucket_updates(url) - before
        arrivals = sorted(_read_record(record)["arrivals"])
        released = _released(url)
    steady = (len(arrivals) - burst) / (arrivals[-1] - arrivals[0])
    return {"scenario": f"limits: rate {rate:g}/s, 2 processes", "system": OURS, "unit": "req/s at the sink",
            "value": round(steady, 1), "requests": requests, "arrived": len(arrivals),
            "released": released, "bucket_updates": updates, "target": rate}


def _cap(server_url: str, *, requests: int = 1000, cap: int = 5) -> Result:
    record = _recording()
    with fresh_database(server_url) as url:
        with sink(200, delay=0.05, record=record) as target:
            _rule(url, target, concurrency=cap)
            _send(url, target, requests)
            _run_until_done(url)
        seen = _read_record(record)
        released = _released(url)
    return {"scenario": f"limits: cap {cap}, 2 processes", "system": OURS,
            "unit": "most in flight at the sink",
            "value": seen["most_in_flight"], "requests": requests, "arrived": len(seen["arrivals"]),
            "released": released, "target": cap}


def _breaker(server_url: str, *, requests: int = 2000, cooldown: float = 2.0,
             seconds: float = 9.0) -> Result:
    record = _recording()
    with fresh_database(server_url) as url:
        with sink(503, record=record) as target:
            _rule(url, target, breaker_failures=5, breaker_cooldown=f"{cooldown} s")
            _send(url, target, requests, attempt_interval=1)
            opened = _watch_first_opening(url)
            pool = _our_worker(url, "--queue", "requests", "--processes", PROCESSES,
                               "--allow-private-networks", "--concurrency", "50")
            time.sleep(seconds)
            pool.terminate()
            pool.wait(60)
        arrivals = sorted(_read_record(record)["arrivals"])
    if not opened:
        raise RuntimeError("the breaker never opened")
    t_open = opened[0]
    first_window = [t for t in arrivals if t_open <= t < t_open + cooldown]
    stopped_after = (first_window[-1] - t_open) if first_window else 0.0
    later = [sum(1 for t in arrivals if t_open + k * cooldown <= t < t_open + (k + 1) * cooldown)
             for k in range(1, int(seconds / cooldown))]
    return {"scenario": "limits: breaker, 2 processes", "system": OURS,
            "unit": "s from opening to the last request of either process", "value": round(stopped_after, 3),
            "probes_per_cooldown": later, "arrived": len(arrivals), "cooldown": cooldown}


def _recording() -> str:
    """A path for the sink's record (written when it stops, read once, then removed)."""
    return str(Path(tempfile.mkdtemp(prefix="pgd-sink-")) / "record.json")


def _read_record(path: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(Path(path).read_text())
    shutil.rmtree(Path(path).parent, ignore_errors=True)
    return record


def _rule(url: str, target: str, **settings: Any) -> None:
    key = "host:" + target.removeprefix("http://")
    columns = ", ".join(settings)
    placeholders = ", ".join(f"%({name})s" for name in settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO dispatch.limits (key, {columns}) VALUES (%(key)s, {placeholders})",
                     {"key": key, **settings})


def _send(url: str, target: str, requests: int, **options: Any) -> None:
    names = "".join(f", {k} => %({k})s" for k in options)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SELECT dispatch.send_request('POST', %(target)s || '/r/' || i, '{{}}'{names}) "
                     "FROM generate_series(1, %(n)s) i", {"target": target, "n": requests, **options})


def _run_until_done(url: str) -> None:
    pool = _our_worker(url, "--queue", "requests", "--processes", PROCESSES, "--allow-private-networks",
                       "--drain")
    if pool.wait() != 0:
        raise RuntimeError("pgdispatch worker failed")


def _released(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM dispatch.job_history WHERE outcome = 'released'").fetchone()
    return int(row[0]) if row else 0


def _watch_first_opening(url: str) -> list[float]:
    """When the breaker first opened (epoch seconds), watched from another thread."""
    opened: list[float] = []

    def watch() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(1500):
                row = conn.execute("""SELECT extract(epoch FROM s.open_until - l.breaker_cooldown)
                                      FROM dispatch.limit_state s, dispatch.limits l
                                      WHERE s.open_until IS NOT NULL""").fetchone()
                if row:
                    opened.append(float(row[0]))
                    return
                time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return opened
