"""A keyed in-process cache that NOTIFY keeps fresh.

Reads of a fresh entry are a dict lookup. A miss loads once however many callers wait for it
(single flight, per key). Entries live for a TTL spread by jitter, so entries loaded together do
not all expire together. invalidate() (on NOTIFY, or after the listener reconnects) forgets one
key or all of them: a load that was in flight when its key was invalidated still answers its
callers but is not kept, so a value read before a change can never outlive the change.
replace_all() swaps in a whole new set of entries at once (a full reload), minus the keys
invalidated while it was being read.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0  # spent in loads, full reloads included
    invalidations: int = 0
    full_reloads: int = 0


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
        self._invalidated_at: dict[K, int] = {}  # key -> the generation that last forgot it
        self._all_invalidated_at = 0
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

    def peek(self, key: K) -> tuple[bool, V | None]:
        """(True, value) when a fresh entry is here, else (False, None); never loads."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            self.counters.hits += 1
            return True, entry[1]
        return False, None

    def values(self) -> list[V]:
        """The fresh entries' values, as they are now."""
        now = self._clock()
        return [value for expires, value in self._entries.values() if expires > now]

    @property
    def generation(self) -> int:
        """Bumped by every invalidation: a reader that saw it change knows its value may be old."""
        return self._generation

    def invalidate(self, key: K | None = None) -> None:
        """Forget one key, or everything; loads of it in flight are not kept."""
        self.counters.invalidations += 1
        self._generation += 1
        if key is None:
            self._all_invalidated_at = self._generation
            self._invalidated_at.clear()
            self._entries = {}
        else:
            self._invalidated_at[key] = self._generation
            self._entries.pop(key, None)

    def replace_all(self, values: Mapping[K, V], started: int) -> bool:
        """Swap in `values` (read from the source when the generation was `started`) as the
        whole cache. False, and nothing kept, when everything was invalidated meanwhile; keys
        invalidated meanwhile are left out, to be loaded again."""
        if self._all_invalidated_at > started:
            return False
        now = self._clock()
        stale = {k for k, at in self._invalidated_at.items() if at > started}
        self._entries = {k: (now + self._lifetime(), v) for k, v in values.items() if k not in stale}
        self._invalidated_at = {k: self._invalidated_at[k] for k in stale}
        self.counters.full_reloads += 1
        return True

    async def _load_and_keep(self, key: K) -> V:
        started = self._generation
        self.counters.loads += 1
        began = time.perf_counter()
        try:
            value = await self._load(key)
        finally:
            self.counters.load_seconds += time.perf_counter() - began
        if self._all_invalidated_at <= started and self._invalidated_at.get(key, 0) <= started:
            self._entries[key] = (self._clock() + self._lifetime(), value)
        return value

    def _lifetime(self) -> float:
        return self._ttl * (1 + random.uniform(-self._jitter, self._jitter))
