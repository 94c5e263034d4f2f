"""A keyed in-process cache that NOTIFY keeps fresh.

Reads of a fresh entry are a dict lookup. A miss loads once however many callers wait for it
(single flight, per key). Entries live for a TTL spread by jitter, so entries loaded together do
not all expire together. invalidate() (on NOTIFY, or after the listener reconnects) bumps a
generation counter: a load that was in flight when the invalidation landed still answers its
callers but is not kept, so a value read before a change can never outlive the change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    invalidations: int = 0


class KeyedCache(Generic[K, V]):
    def __init__(self, load: Callable[[K], Awaitable[V]], *, ttl: float, jitter: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._ttl = ttl
        self._jitter = jitter
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}
        self._generation = 0
        self.counters = CacheCounters()

    async def get(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            self.counters.hits += 1
            return entry[1]
        self.counters.misses += 1
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load_and_keep(key))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    @property
    def generation(self) -> int:
        """Bumped by every invalidation: a reader that saw it change knows its value may be old."""
        return self._generation

    def invalidate(self, key: K | None = None) -> None:
        """Forget one key, or everything; loads in flight are not kept."""
        self.counters.invalidations += 1
        self._generation += 1
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)

    async def _load_and_keep(self, key: K) -> V:
        generation = self._generation
        self.counters.loads += 1
        value = await self._load(key)
        if generation == self._generation:
            spread = 1 + random.uniform(-self._jitter, self._jitter)
            self._entries[key] = (self._clock() + self._ttl * spread, value)
        return value
