"""The in-process cache of enterprises' integration configs (seed 004).

Each process that delivers call events or answers smart redirects keeps one. Reads of a cached
enterprise are a dict lookup with no lock and no await on the database; entries are immutable
and the whole set is swapped at once by a full reload. A miss loads that one enterprise, once
however many callers want it (single flight); an unknown enterprise is cached too, so a flood
of events for it costs one query per TTL. Freshness, from the fastest to the safety nets:

- a NOTIFY on the config channel after each committed change forgets exactly the enterprise it
  names (or everything, for a bulk change);
- after the listener reconnects (notifications sent meanwhile are lost) it LISTENs first, then
  everything is reloaded;
- a full reload every 180-300 s (a random interval each time, so processes do not reload
  together), and a TTL of 90 s (jittered by 10%) per entry.

Secrets are kept in memory only; the reprs below never show them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgdispatch import sql
from pgdispatch.db.connections import own_database
from pgdispatch.notify import config_message, log_failure
from pgdispatch.notify.cache import KeyedCache

log = logging.getLogger(__name__)

TTL = 90.0
FULL_RELOAD_EVERY = (180.0, 300.0)


@dataclass(frozen=True, slots=True)
class Integration:
    name: str
    enabled: bool
    settings: Mapping[str, Any] = field(repr=False)  # api keys inside


@dataclass(frozen=True, slots=True)
class EnterpriseConfig:
    number: str
    integrations: Mapping[str, Integration]

    def enabled(self) -> dict[str, bool]:
        """This enterprise's row of the enabled matrix: {crm: bool}."""
        return {name: i.enabled for name, i in self.integrations.items()}


def enterprise_config(number: str, config: Mapping[str, Any]) -> EnterpriseConfig:
    integrations = {
        name: Integration(name, bool(settings.get("enabled")), MappingProxyType(dict(settings)))
        for name, settings in config.items() if isinstance(settings, Mapping)}
    return EnterpriseConfig(number, MappingProxyType(integrations))


class IntegrationConfigs:
    def __init__(self, pool: AsyncConnectionPool, *, ttl: float = TTL,
                 full_reload_every: tuple[float, float] = FULL_RELOAD_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._full_reload_every = full_reload_every
        self._cache: KeyedCache[str, EnterpriseConfig | None] = KeyedCache(
            self._load, ttl=ttl, clock=clock)
        self._full_reload: asyncio.Future[None] | None = None
        self.reconnects = 0

    async def get(self, number: str) -> EnterpriseConfig | None:
        """The enterprise's config; None when there is no such enterprise."""
        return await self._cache.get(number)

    def cached(self, number: str) -> tuple[bool, EnterpriseConfig | None]:
        """(True, config or None) when the cache holds a fresh answer; never touches the database."""
        return self._cache.peek(number)

    def enabled_matrix(self) -> dict[str, dict[str, bool]]:
        """enterprise -> {crm: enabled}, for every enterprise cached now."""
        return {c.number: c.enabled() for c in self._cache.values() if c is not None}

    def on_notify(self, payload: str | None) -> None:
        """A config-channel notification; None after the listener reconnected (it LISTENs
        again before calling this, so nothing committed from now on is missed)."""
        if payload is None:
            self.reconnects += 1
            self._cache.invalidate()  # also a reload that began before: it may miss what was lost
            self._reload_soon()
            return
        message = config_message(payload)
        if message.get("table") != "enterprises":
            return
        enterprise = message.get("enterprise")
        if isinstance(enterprise, str):
            self._cache.invalidate(enterprise)
        else:  # a bulk change: everything, at once
            self._cache.invalidate()
            self._reload_soon()

    async def reload_all(self) -> None:
        """Read every enterprise and swap them all in; concurrent callers share one reload."""
        if self._full_reload is None or self._full_reload.done():
            self._full_reload = asyncio.ensure_future(self._reload_all())
        await asyncio.shield(self._full_reload)

    async def _reload_all(self) -> None:
        while True:  # again when everything was invalidated while it read
            started = self._cache.generation
            if self._cache.replace_all(await self._load_all(), started):
                return

    async def reload_forever(self) -> None:
        """The safety net under NOTIFY: a full reload every 180-300 s."""
        while True:
            await asyncio.sleep(random.uniform(*self._full_reload_every))
            try:
                await self.reload_all()
            except Exception as exc:  # the cached configs stay; the TTL reloads them one by one
                log.warning("integration config reload failed: %s", exc)

    def stats(self) -> dict[str, Any]:
        counters = asdict(self._cache.counters)
        counters["load_seconds"] = round(counters["load_seconds"], 6)
        return {**counters, "reconnects": self.reconnects, "enterprises": len(self._cache.values())}

    def _reload_soon(self) -> None:
        reloading = asyncio.ensure_future(self.reload_all())
        reloading.add_done_callback(log_failure(log, "integration config reload failed"))

    async def _load(self, number: str) -> EnterpriseConfig | None:
        with own_database():  # losing our database postpones the event, never fails it
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql.query("enterprise_config"), {"number": number})
                row = await cur.fetchone()
        return None if row is None else enterprise_config(number, row[0])

    async def _load_all(self) -> dict[str, EnterpriseConfig | None]:
        began = time.perf_counter()
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql.query("enterprise_configs"))
                rows = await cur.fetchall()
        finally:
            self._cache.counters.load_seconds += time.perf_counter() - began
        return {number: enterprise_config(number, config) for number, config in rows}
