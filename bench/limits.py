"""The shared-limits scenario (`pgdispatch bench --scenario limits`): two worker processes, one
destination, limits counted where they matter, at the receiving server.

- rate: 4,000 requests, a rule of 200 requests/s for the host: the rate the sink saw after the
  first burst (the bucket's size), and how many jobs went back to the queue;
- cap: 1,000 requests answered in 50 ms, a rule of 5 in flight: the most the sink held at once;
- breaker: 2,000 requests to an endpoint answering 503, breaker after 5 failures, cooldown 2 s:
  how long after the opening the other process's requests stopped arriving, and the most
  requests that reached the endpoint in any cooldown after that (one probe each: 1).
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


def _rate(server_url: str, *, requests: int = 4000, rate: float = 200.0) -> Result:
    burst = int(rate)
    record = _recording()
    with fresh_database(server_url) as url:
        with sink(200, record=record) as target:
            _rule(url, target, rate=rate, burst=burst)
            _send(url, target, requests)
            _run_until_done(url)
        arrivals = sorted(_read_record(record)["arrivals"])
        released = _released(url)
    steady = (len(arrivals) - burst) / (arrivals[-1] - arrivals[0])
    return {"scenario": f"limits: rate {rate:g}/s, 2 processes", "system": OURS, "unit": "req/s at the sink",
            "value": round(steady, 1), "requests": requests, "arrived": len(arrivals),
            "released": released, "target": rate}


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
