"""The in-process cache of dispatch.queues.

Reads are plain dict lookups on an immutable snapshot swapped atomically. A NOTIFY on the config
channel, a reconnect of the listener, or the periodic refresh reloads it; concurrent reload
requests share one database round trip (single flight, notify/cache.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from pgdispatch import sql
from pgdispatch.notify import log_failure
from pgdispatch.notify.cache import CacheCounters, KeyedCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    name: str
    max_attempts: int
    backoff_base: float
    backoff_factor: float
    backoff_cap: float
    backoff_jitter: float
    job_timeout: float
    concurrency: int | None
    paused: bool
    dedupe_window: float


class QueuePolicies:
    """dispatch.queues as one snapshot, kept in the shared KeyedCache (single-flight loads,
    generation counter), read synchronously by the claim loop."""

    def __init__(self, pool: AsyncConnectionPool, *, refresh_every: float = 60.0) -> None:
        self._pool = pool
        self._refresh_every = refresh_every
        self._cache: KeyedCache[str, Mapping[str, QueuePolicy]] = KeyedCache(
            self._load, ttl=refresh_every)
        self._snapshot: Mapping[str, QueuePolicy] = MappingProxyType({})
        self._reloading: asyncio.Task[None] | None = None

    def get(self, name: str) -> QueuePolicy | None:
        return self._snapshot.get(name)

    def names(self) -> list[str]:
        return list(self._snapshot)

    @property
    def counters(self) -> CacheCounters:
        return self._cache.counters

    async def reload(self) -> None:
        """Load now. A change notified while the load runs is not lost: the snapshot is only
        taken from a load that no invalidation overtook, else it loads again."""
        self._cache.invalidate()
        while True:
            generation = self._cache.generation
            snapshot = await self._cache.get(ALL)
            if generation == self._cache.generation:
                self._snapshot = snapshot
                return

    def invalidate(self) -> None:
        """Reload soon (called from the NOTIFY handler, which must not block)."""
        self._cache.invalidate()
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self.reload())
            self._reloading.add_done_callback(log_failure(log, "queue policy load failed"))

    async def refresh_forever(self) -> None:
        """The safety net under NOTIFY: a full reload every `refresh_every` seconds."""
        while True:
            await asyncio.sleep(self._refresh_every)
            try:
                await self.reload()
            except Exception as exc:  # a failed refresh keeps the last good snapshot
                log.warning("queue policy refresh failed: %s", exc)

    async def _load(self, _: str) -> Mapping[str, QueuePolicy]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(QueuePolicy))
            await cur.execute(sql.query("load_queues"))
            rows = await cur.fetchall()
        return MappingProxyType({p.name: p for p in rows})


ALL = "*"
