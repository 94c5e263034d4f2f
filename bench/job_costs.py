"""The cost scenario (`pgdispatch bench --scenario cost`): what one job of each type costs, drained
by one worker with its defaults from a backlog, to the local sink where it sends anything: CPU
of the worker and of its PostgreSQL backends, WAL bytes, rows written and round trips per job.
The sizing table in docs/performance.md is computed from these rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import psycopg

from pgdispatch.bench.process_app import app as noop_app
from pgdispatch.bench.scenarios import (
    OURS,
    Drained,
    Result,
    _our_drain,
    _queue_noops,
    fresh_database,
    round_trips,
    sink,
)

APP = ("--app", "pgdispatch.bench.process_app:app")
PRIVATE = ("--allow-private-networks",)


def _requests(target: str) -> Callable[[str, int], None]:
    def fill(url: str, n: int) -> None:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("""SELECT dispatch.send_request('POST', %s || '/r/' || i, 'payload',
                                                      success_code => 202)
                         FROM generate_series(1, %s) i""", (target, n))
    return fill


def _process_steps(url: str, n: int) -> None:
    async def register() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await noop_app.register(conn)
    asyncio.run(register())
    with psycopg.connect(url, autocommit=True) as c:  # five steps an instance
        c.execute("SELECT count(dispatch.start_process('bench_noop')) FROM generate_series(1, %s)",
                  (max(n // 5, 1),))
        c.execute("VACUUM ANALYZE dispatch.jobs")


def _leads(target: str) -> Callable[[str, int], None]:
    """`n` leads of 100 entities, each entity with a webhook to the sink: one delivery a lead."""
    def fill(url: str, n: int) -> None:
        with psycopg.connect(url, autocommit=True) as c:
            for entity in range(1, 101):
                c.execute("""WITH c AS (INSERT INTO dispatch.credentials (type, name, settings)
                                        VALUES ('webhooks', %s, %s) RETURNING id)
                             INSERT INTO dispatch.entity_credentials SELECT %s, id FROM c""",
                          (f"hook {entity}", json.dumps({"url": f"{target}/hook/{entity}"}), entity))
            c.execute("""INSERT INTO dispatch.leads (external_entity_id, data)
                         SELECT 1 + i %% 100,
                                jsonb_build_object('name', 'Lead ' || i, 'phone', '+48 600 ' || i)
                         FROM generate_series(1, %s) i""", (n,))
            c.execute("SELECT count(dispatch.send_lead(id)) FROM dispatch.leads")
            c.execute("VACUUM ANALYZE dispatch.jobs")
    return fill


def _call_events(target: str) -> Callable[[str, int], None]:
    """`n` call events of 100 enterprises, each with a webhook to the sink: one request each."""
    def fill(url: str, n: int) -> None:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("""INSERT INTO dispatch.enterprises (number, name, integrations_config)
                         SELECT 'e' || i, 'e' || i, jsonb_build_object('webhook', jsonb_build_object(
                             'enabled', true, 'url', %s || '/calls/e' || i))
                         FROM generate_series(0, 99) i""", (target,))
            c.execute("""SELECT count(*) FROM generate_series(1, %s) i,
                              dispatch.call_event('e' || i %% 100, 'dial', 'call-' || i,
                                                  jsonb_build_object('phone', '+7999' || i))""", (n,))
            c.execute("VACUUM ANALYZE dispatch.jobs")
    return fill


def _partial(fill: Callable[[str, int], None], n: int) -> Callable[[str], None]:
    return lambda url: fill(url, n)


def costs(server_url: str, *, jobs: int = 10_000) -> list[Result]:
    results = []
    with sink(202) as target:
        kinds: list[tuple[str, Callable[[str, int], None], Callable[[str], Drained]]] = [
            ("no-op job", _queue_noops, lambda url: _our_drain(url)),
            ("HTTP request", _requests(target), lambda url: _our_drain(url, "--queue", "requests", *PRIVATE)),
            ("process step", _process_steps, lambda url: _our_drain(
                url, *APP, history="dispatch.process_history", outcome="status = 'done'")),
            ("lead delivery", _leads(target), lambda url: _our_drain(url, "--queue", "leads", *PRIVATE)),
            ("call event", _call_events(target), lambda url: _our_drain(url, "--queue", "crm", *PRIVATE)),
        ]
        for label, fill, drain in kinds:
            with fresh_database(server_url) as url:
                fill(url, jobs)
                drained = drain(url)
            trips = round_trips(server_url, _partial(fill, max(jobs // 5, 1)), drain)
            results.append({"scenario": f"cost: {label}", "system": OURS, "unit": "jobs/s",
                            "value": round(drained.rate), "completed": drained.done, **drained.cost,
                            "round_trips": trips})
    return results
