"""The in-process cache of dispatch.queues.

Reads are plain dict lookups on an immutable snapshot swapped atomically. A NOTIFY on the config
channel, a reconnect of the listener, or the periodic refresh reloads it; concurrent reload
requests share one database round trip (single flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

import sql

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
    def __init__(self, pool: AsyncConnectionPool, *, refresh_every: float = 60.0) -> None:
        self._pool = pool
        self._refresh_every = refresh_every
        self._snapshot: Mapping[str, QueuePolicy] = MappingProxyType({})
        self._loading: asyncio.Task[None] | None = None
        self._stale = False

    def get(self, name: str) -> QueuePolicy | None:
        return self._snapshot.get(name)

    def names(self) -> list[str]:
        return list(self._snapshot)

    async def reload(self) -> None:
        """Reload now; callers arriving while a load is in flight share it."""
        await asyncio.shield(self._start_loading())

    def invalidate(self) -> None:
        """Schedule a reload (called from the NOTIFY handler, which must not block)."""
        self._start_loading()

    def _start_loading(self) -> asyncio.Task[None]:
        # A change that lands while a load is in flight may have been missed by it: mark the
        # snapshot stale so the running loader goes round once more.
        self._stale = True
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_until_fresh())
            self._loading.add_done_callback(_log_failure)
        return self._loading

    async def _load_until_fresh(self) -> None:
        while self._stale:
            self._stale = False
            await self._load()

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_every)
            try:
                await self.reload()
            except Exception as exc:  # a failed refresh keeps the last good snapshot
                log.warning("queue policy refresh failed: %s", exc)

    async def _load(self) -> None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(QueuePolicy))
            await cur.execute(sql.query("load_queues"))
            rows = await cur.fetchall()
        self._snapshot = MappingProxyType({p.name: p for p in rows})


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("queue policy load failed: %s", task.exception())
