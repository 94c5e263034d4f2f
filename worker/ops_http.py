"""HTTP on the pool: /health, /stats (JSON), /metrics (Prometheus) for operators, and
/smart-redirect for the telephony side (worker/smart_redirect.py).

Figures come from the database (dispatch.queue_stats, dispatch.worker_status,
dispatch.integration_status), so every pool on every host reports the same truth, plus this
pool's own process table and smart-redirect counters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import datetime
from typing import Any

import psycopg
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg.rows import dict_row

from pgdispatch import sql
from pgdispatch.notify.cache import CacheCounters
from pgdispatch.worker.smart_redirect import BadRequest, SmartRedirect

log = logging.getLogger(__name__)


async def read_stats(database_url: str, *, integrations: str = "integration_status") -> dict[str, Any]:
    """What /stats shows; /metrics reads `integrations` from crm_breakers, which skips the history."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True,
                                                     connect_timeout=5) as conn, conn.transaction():
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql.query("operator_reads"))
        await cur.execute(sql.query("queue_stats"))
        queues = await cur.fetchall()
        await cur.execute(sql.query("worker_status"))
        workers = await cur.fetchall()
        await cur.execute(sql.query("limit_status"))
        limits = await cur.fetchall()
        await cur.execute(sql.query(integrations))
        crms = await cur.fetchall()
    return {"queues": queues, "workers": workers, "limits": limits, "integrations": crms}


class _Snapshot:
    """A prometheus collector over the last stats read."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {"queues": [], "workers": [], "limits": [], "integrations": []}
        self.redirect: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("pgdispatch_jobs", "Jobs by queue and state", labels=["queue", "state"])
        wait = GaugeMetricFamily("pgdispatch_oldest_wait_seconds",
                                 "Age of the oldest runnable job", labels=["queue"])
        for q in self.stats["queues"]:
            for state in ("available", "scheduled", "running", "dead"):
                jobs.add_metric([q["queue"], state], q[state])
            wait.add_metric([q["queue"]], q["oldest_wait_seconds"] or 0)
        # Workers by host and status, database-wide: a worker's id (host:pid:token) is no label,
        # it would make new series at every restart.
        workers = GaugeMetricFamily("pgdispatch_workers", "Worker processes by host and status, all pools",
                                    labels=["host", "status"])
        running = GaugeMetricFamily("pgdispatch_workers_running_jobs",
                                    "Jobs running in live workers, by host (database-wide)", labels=["host"])
        by_host: dict[tuple[str, str], int] = {}
        jobs_by_host: dict[str, int] = {}
        for w in self.stats["workers"]:
            by_host[(w["host"], w["status"])] = by_host.get((w["host"], w["status"]), 0) + 1
            if w["status"] == "alive":
                jobs_by_host[w["host"]] = jobs_by_host.get(w["host"], 0) + w["running"]
        for (host, status), count in sorted(by_host.items()):
            workers.add_metric([host, status], count)
        for host, count in sorted(jobs_by_host.items()):
            running.add_metric([host], count)
        in_flight = GaugeMetricFamily("pgdispatch_limit_in_flight",
                                      "Requests in flight under a limit key, across all workers",
                                      labels=["key"])
        tokens = GaugeMetricFamily("pgdispatch_limit_tokens", "Tokens left in a rate-limited key's bucket",
                                   labels=["key"])
        blocked = GaugeMetricFamily("pgdispatch_limit_blocked",
                                    "1 while a key sends nothing: breaker open, or paused by Retry-After",
                                    labels=["key", "why"])
        for limit in self.stats.get("limits", []):
            in_flight.add_metric([limit["key"]], limit["in_flight"])
            if limit["tokens"] is not None:
                tokens.add_metric([limit["key"]], float(limit["tokens"]))
            blocked.add_metric([limit["key"], "breaker"], 1 if limit["breaker"] == "open" else 0)
            blocked.add_metric([limit["key"], "paused"], 1 if limit["paused_until"] else 0)
        yield from (jobs, wait, workers, running, in_flight, tokens, blocked)
        yield from self._integrations()

    def _integrations(self) -> Iterator[Metric]:
        cache = CounterMetricFamily("pgdispatch_config_cache",
                                    "Integration config cache events of live workers (database-wide)",
                                    labels=["event"])
        totals: dict[str, int] = {}
        for w in self.stats["workers"]:
            counters = (w.get("stats") or {}).get("integration_config_cache") or {}
            if w["status"] == "alive":
                for event in CACHE_EVENTS:
                    totals[event] = totals.get(event, 0) + int(counters.get(event, 0))
        for event, count in totals.items():
            cache.add_metric([event], count)
        breaker = GaugeMetricFamily("pgdispatch_crm_breaker_open",
                                    "1 while the circuit breaker of an enterprise's CRM is open",
                                    labels=["enterprise", "integration"])
        for i in self.stats.get("integrations", []):
            breaker.add_metric([i["enterprise"], i["integration"]], 1 if i["breaker"] == "open" else 0)
        yield from (cache, breaker)
        if self.redirect is not None:
            asked = CounterMetricFamily("pgdispatch_smart_redirect", "Smart redirect answers by result",
                                        labels=["result"])
            for result in ("redirected", "not_redirected", "over_budget"):
                asked.add_metric([result], self.redirect[result])
            yield asked


CACHE_EVENTS = (*(f.name for f in fields(CacheCounters)), "reconnects")

PoolInfo = Callable[[], dict[str, Any]]


class OpsServer:
    """Serves what the database knows (every pool on every host reports the same truth) and
    what `pool_info` says of this pool's processes; it knows nothing else of the pool."""

    def __init__(self, database_url: str, pool_info: PoolInfo, *, port: int,
                 host: str = "127.0.0.1", metrics_dir: str | None = None) -> None:
        self._database_url = database_url
        self._pool_info = pool_info
        # Set once its connections are up (the pool starts its workers meanwhile).
        self.redirect: SmartRedirect | None = None
        self._host = host
        self._port = port
        self._snapshot = _Snapshot()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._snapshot)
        if metrics_dir is not None:  # this pool's workers' own counters and histograms, summed
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self._registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/smart-redirect", self._smart_redirect)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("ops HTTP on http://%s:%d (/health /stats /metrics /smart-redirect)", self._host, self._port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        # Cheap on purpose (load balancers poll it): one round trip, no table scan.
        info = self._pool_info()
        try:
            async with await psycopg.AsyncConnection.connect(
                    self._database_url, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(sql.query("ping"))
            database = "ok"
        except psycopg.Error as exc:
            database = f"unavailable: {type(exc).__name__}"
        healthy = database == "ok" and info["alive"] == info["processes"] > 0
        body = {"status": "ok" if healthy else "degraded", "database": database, "pool": info}
        return web.json_response(body, status=200 if healthy else 503)

    async def _stats(self, request: web.Request) -> web.Response:
        try:
            stats = await read_stats(self._database_url)
        except psycopg.Error as exc:
            return web.json_response({"error": f"database unavailable: {type(exc).__name__}"},
                                     status=503)
        stats["pool"] = self._pool_info()
        if self.redirect is not None:
            stats["smart_redirect"] = self.redirect.stats()
        return web.Response(text=json.dumps(stats, default=_json_default),
                            content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            self._snapshot.stats = await read_stats(self._database_url, integrations="crm_breakers")
        except psycopg.Error:
            return web.Response(status=503, text="database unavailable\n")
        self._snapshot.redirect = None if self.redirect is None else self.redirect.stats()
        return web.Response(body=generate_latest(self._registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


    async def _smart_redirect(self, request: web.Request) -> web.Response:
        if self.redirect is None:
            return web.json_response({"redirect": False, "reason": "smart redirect is starting"})
        try:
            answer = await self.redirect.answer(request.query.get("enterprise"), request.query.get("phone"))
        except BadRequest as bad:
            return web.json_response({"error": str(bad)}, status=400)
        return web.json_response(answer)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
