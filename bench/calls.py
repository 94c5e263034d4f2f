"""The calls scenario (`pgdispatch bench --scenario calls`): CRM call events (seed 004).

- Propagation: 4 processes, each with the integration config cache and its LISTEN connection as
  a worker process has them; a change committed on another connection, 20 times: the time until
  the last of the 4 has forgotten the old config.
- Accepting: dispatch.call_event, one event per transaction (as a telephony server sends each
  event), on 16 connections for 3 s with no worker running: the ceiling of durable commits.
- Load: 1,000 enterprises, each with 2 enabled CRMs (RetailCRM and a webhook) on local
  stand-ins (bench/vendors.py; RetailCRM refuses more than 10 requests/s per key). Calls arrive
  at a fixed rate, 4 events each (dial, bridge, hangup, download), on 16 connections, while a
  pool of 2 worker processes (defaults) delivers them: events accepted/s, requests delivered/s,
  the time from each call's first event to each of its requests at the CRM (p50/p99), and what
  was lost (expected requests minus those the CRMs accepted; the engine's dead jobs). At a
  steady rate each event is its own call_event; at the peak (1,000 calls/s for 5 s) each
  connection sends what arrived meanwhile as one dispatch.call_events batch, as a gateway would.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdispatch.bench.scenarios import OURS, Result, fresh_database, local_server, summary

ENTERPRISES = 1000
RATES = (("steady", 25, 10, False), ("peak", 1000, 5, True))  # (label, calls/s, seconds, batched)
EVENTS = ("dial", "bridge", "hangup", "download")
PRODUCERS = 16
# Requests each call makes: RetailCRM 3 events + 2 uploads (hangup, download), a webhook 4.
REQUESTS_PER_CALL = {"retailcrm": 5, "webhook": 4}
CACHES, CHANGES = 4, 20


def calls(server_url: str) -> list[Result]:
    results = [_propagation(server_url), _accepting(server_url)]
    for label, rate, seconds, batched in RATES:
        results += _load(server_url, label, rate, seconds, batched)
    return results


# -- propagation ----------------------------------------------------------------------------------

def _propagation(server_url: str) -> Result:
    spawn = multiprocessing.get_context("spawn")
    with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.enterprises VALUES ('p', 'p', %s)", (json.dumps(
            {"webhook": {"enabled": True, "url": "http://127.0.0.1:9/x"}}),))
        reports: Any = spawn.Queue()
        children = [spawn.Process(target=_cache_process, args=(url, reports), daemon=True)
                    for _ in range(CACHES)]
        for child in children:
            child.start()
        for _ in children:
            reports.get(timeout=60)  # listening
        delays = []
        for change in range(CHANGES):
            committed = time.time()
            conn.execute("UPDATE dispatch.enterprises SET integrations_config = "
                         "jsonb_set(integrations_config, '{webhook,enabled}', %s) WHERE number = 'p'",
                         (json.dumps(change % 2 == 1),))
            seen = [reports.get(timeout=10) for _ in children]
            delays.append((max(seen) - committed) * 1000)
        for child in children:
            child.terminate()
            child.join(10)
    delays.sort()
    return {"scenario": f"calls: a committed config change seen by {CACHES} processes", "system": OURS,
            "unit": "ms", "value": round(max(delays), 2),
            **{f"{k}_ms": v for k, v in summary(delays).items()}}


def _cache_process(url: str, reports: Any) -> None:
    asyncio.run(_listen_and_report(url, reports))


async def _listen_and_report(url: str, reports: Any) -> None:
    from pgdispatch.notify import CONFIG_CHANNEL
    from pgdispatch.notify.integrations import IntegrationConfigs
    from pgdispatch.notify.listener import Listener

    async with AsyncConnectionPool(url, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
        configs = IntegrationConfigs(pool)
        await configs.reload_all()

        def on_notify(channel: str, payload: str) -> None:
            configs.on_notify(payload)
            if not configs.cached("p")[0]:  # forgotten: the next read loads the new config
                reports.put(time.time())

        async def reconnected() -> None:
            configs.on_notify(None)

        listener = Listener(url, [CONFIG_CHANNEL], on_notify=on_notify, on_reconnect=reconnected)
        task = asyncio.create_task(listener.run())
        await listener.connected.wait()
        reports.put(time.time())
        while True:  # read again after each change, as the next event would
            await asyncio.sleep(0.001)
            if not configs.cached("p")[0]:
                await configs.get("p")
        await task


# -- load -----------------------------------------------------------------------------------------

def _accepting(server_url: str) -> Result:
    with fresh_database(server_url) as url:
        _enterprises(url, "http://127.0.0.1:9")
        accepted, took = asyncio.run(_offer(url, rate=100_000, seconds=3, batched=False, stop_after=3.0))
    return {"scenario": "calls: call_event, one event per transaction, no worker", "system": OURS,
            "unit": "events/s", "value": round(accepted / took)}


def _enterprises(url: str, base: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""INSERT INTO dispatch.enterprises (number, name, integrations_config)
                        SELECT 'e' || i, 'e' || i, jsonb_build_object(
                            'retailcrm', jsonb_build_object('enabled', true, 'api_key', 'key-' || i,
                                                            'api_url', %(base)s || '/crm/e' || i),
                            'webhook', jsonb_build_object('enabled', true,
                                                          'url', %(base)s || '/calls/e' || i))
                        FROM generate_series(0, %(n)s - 1) i""", {"base": base, "n": ENTERPRISES})


def _load(server_url: str, label: str, rate: int, seconds: int, batched: bool) -> list[Result]:
    record = Path(tempfile.mkdtemp(prefix="pgd-vendors-")) / "record.json"
    with fresh_database(server_url) as url, \
            local_server("pgdispatch.bench.vendors", "--record", str(record)) as base:
        _enterprises(url, base)
        pool = subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--queue", "crm",
                                 "--processes", "2", "--allow-private-networks"],
                                env={**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING"})
        try:
            _wait(url, "SELECT count(*) = 2 FROM dispatch.worker_status WHERE status = 'alive'", 60)
            accepted, accept_seconds = asyncio.run(_offer(url, rate, seconds, batched))
            started = time.perf_counter()
            _wait(url, "SELECT NOT EXISTS (SELECT FROM dispatch.jobs)", 900)
            drained = time.perf_counter() - started + accept_seconds
        finally:
            pool.send_signal(signal.SIGTERM)
            pool.wait(60)
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FILTER (WHERE outcome = 'completed'), count(*) "
                               "FILTER (WHERE outcome = 'dead') FROM dispatch.job_history").fetchone()
    seen = json.loads(record.read_text())
    record.unlink()
    assert row is not None
    calls_made = rate * seconds
    expected = {crm: n * calls_made for crm, n in REQUESTS_PER_CALL.items()}
    delivered = sum(seen["accepted"].get(crm, 0) for crm in expected)
    head = f"calls {label}: {rate:,} calls/s x 4 events for {seconds} s to 2 CRMs" + (
        ", batched" if batched else "")
    lost = sum(max(0, n - seen["accepted"].get(crm, 0)) for crm, n in expected.items())
    return [
        {"scenario": f"{head}: events accepted", "system": OURS, "unit": "events/s",
         "value": round(accepted / accept_seconds), "offered": rate * 4},
        {"scenario": f"{head}: delivered to the CRMs", "system": OURS, "unit": "requests/s",
         "value": round(delivered / drained), "requests": delivered, "seconds": round(drained, 1),
         "refused_for_a_limit": seen["refused"]},
        *({"scenario": f"{head}: call to {crm} p99", "system": OURS, "unit": "ms",
           "value": round(summary(latencies)["p99"]), **{f"{k}_ms": v for k, v in summary(latencies).items()}}
          for crm in expected
          for latencies in [sorted(x * 1000 for x in seen["latencies"].get(crm, []))]),
        {"scenario": f"{head}: lost", "system": OURS, "unit": "requests", "value": lost,
         "expected": expected, "accepted": seen["accepted"], "jobs_completed": row[0], "jobs_dead": row[1]},
    ]


async def _offer(url: str, rate: int, seconds: int, batched: bool,
                 stop_after: float | None = None) -> tuple[int, float]:
    """Calls at `rate` per second for `seconds` (or until `stop_after`), 4 events each, on
    PRODUCERS connections: each event its own call_event, or (batched) everything waiting for a
    connection in one call_events. Returns the events accepted and how long that took."""
    accepted = 0
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    started = time.perf_counter()

    def event(n: int, name: str, call: str) -> dict[str, Any]:
        return {"enterprise": f"e{n % ENTERPRISES}", "event": name, "call_unique_id": call,
                "payload": {"phone": f"+7999{n:07d}", "extension": "151", "status": "answered",
                            "duration": 30, "record_url": f"https://rec.example/{n}.mp3"}}

    async def producer(pool: AsyncConnectionPool) -> None:
        nonlocal accepted
        async with pool.connection() as conn:
            while (n := await queue.get()) is not None:
                calls = [n]
                while batched and not queue.empty() and len(calls) < 250:
                    if (more := queue.get_nowait()) is None:
                        queue.put_nowait(None)  # for the next producer
                        break
                    calls.append(more)
                events = [event(k, name, f"c{k}@{time.time():.6f}") for k in calls for name in EVENTS]
                if batched:
                    await conn.execute("SELECT count(*) FROM dispatch.call_events(%s)", (json.dumps(events),))
                else:
                    for e in events:
                        await conn.execute("SELECT dispatch.call_event(%s, %s, %s, %s)", (
                            e["enterprise"], e["event"], e["call_unique_id"], json.dumps(e["payload"])))
                accepted += len(events)

    async with AsyncConnectionPool(url, min_size=PRODUCERS, max_size=PRODUCERS,
                                   kwargs={"autocommit": True}) as pool:
        workers = [asyncio.create_task(producer(pool)) for _ in range(PRODUCERS)]
        for n in range(rate * seconds):
            delay = started + n / rate - time.perf_counter()
            if stop_after is not None and time.perf_counter() - started > stop_after:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            elif stop_after is not None and queue.qsize() > PRODUCERS:
                await asyncio.sleep(0.001)  # no deadline to keep: only keep every connection busy
            queue.put_nowait(n)
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    return accepted, time.perf_counter() - started


def _wait(url: str, condition: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while not (conn.execute(condition).fetchone() or (False,))[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not within {timeout:g}s: {condition}")
            time.sleep(0.2)
