"""The integration config cache (notify/integrations.py) against a real PostgreSQL and real
NOTIFY: single flight, TTL with an injected clock, exact invalidation, bulk reloads, and the
reload that heals notifications lost while the listener was away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdispatch.notify import CONFIG_CHANNEL
from pgdispatch.notify.cache import KeyedCache
from pgdispatch.notify.integrations import IntegrationConfigs
from pgdispatch.notify.listener import Listener
from tests.helpers import execute, wait_until

RETAILCRM = {"enabled": True, "api_url": "https://acme.retailcrm.ru", "api_key": "api-key-PLANTED"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def add_enterprises(db_url: str, *numbers: str, enabled: bool = True) -> None:
    execute(db_url, "INSERT INTO dispatch.enterprises (number, name, integrations_config) "
                    "SELECT n, 'E ' || n, %s FROM unnest(%s::text[]) n",
            (json.dumps({"retailcrm": {**RETAILCRM, "enabled": enabled}}), list(numbers)))


def set_enabled(db_url: str, number: str, enabled: bool) -> None:
    execute(db_url, "UPDATE dispatch.enterprises SET integrations_config = jsonb_set(integrations_config, "
                    "'{retailcrm,enabled}', %s) WHERE number = %s", (json.dumps(enabled), number))


@asynccontextmanager
async def cache_listening(db_url: str, **settings: Any) -> AsyncIterator[tuple[IntegrationConfigs, Listener]]:
    """A cache fed by a Listener of its own, as in a worker process."""
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
        configs = IntegrationConfigs(pool, **settings)

        async def reconnected() -> None:
            configs.on_notify(None)

        listener = Listener(db_url, [CONFIG_CHANNEL], on_notify=lambda _, payload: configs.on_notify(payload),
                            on_reconnect=reconnected, max_backoff=0.2)
        task = asyncio.create_task(listener.run())
        await asyncio.wait_for(listener.connected.wait(), 10)
        try:
            yield configs, listener
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_misses_load_once_hits_read_memory_and_entries_expire(db_url: str) -> None:
    add_enterprises(db_url, "0367")
    clock = Clock()
    async with AsyncConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
        configs = IntegrationConfigs(pool, ttl=90, clock=clock)
        first = await asyncio.gather(*(configs.get("0367") for _ in range(50)))  # 50 misses at once
        assert {c.enabled()["retailcrm"] for c in first if c is not None} == {True}
        assert configs.stats()["loads"] == 1 and configs.stats()["misses"] == 50
        assert (await configs.get("0367")) is first[0] and configs.stats()["hits"] == 1
        assert configs.cached("0367") == (True, first[0])
        # An unknown enterprise is an answer too: cached, so a flood of events for it costs one query.
        assert await asyncio.gather(*(configs.get("nope") for _ in range(10))) == [None] * 10
        assert configs.stats()["loads"] == 2
        set_enabled(db_url, "0367", False)  # no listener here: only the TTL can notice
        clock.now += 80  # within the TTL (90 s, jittered by 10%)
        assert (await configs.get("0367")).enabled() == {"retailcrm": True}  # type: ignore[union-attr]
        clock.now += 20  # past it
        assert configs.cached("0367") == (False, None)
        assert (await configs.get("0367")).enabled() == {"retailcrm": False}  # type: ignore[union-attr]
        assert configs.stats()["loads"] == 3
        assert configs.enabled_matrix() == {"0367": {"retailcrm": False}}
        assert "api-key-PLANTED" not in repr(first[0]) and "api-key-PLANTED" not in json.dumps(configs.stats())


async def test_a_notify_forgets_exactly_the_enterprise_changed(db_url: str) -> None:
    add_enterprises(db_url, "A", "B")
    async with cache_listening(db_url) as (configs, _):
        await configs.reload_all()
        assert configs.enabled_matrix() == {"A": {"retailcrm": True}, "B": {"retailcrm": True}}
        set_enabled(db_url, "A", False)
        await wait_until(lambda: configs.cached("A") == (False, None))
        assert configs.cached("B")[0]  # B stays cached
        assert (await configs.get("A")).enabled() == {"retailcrm": False}  # type: ignore[union-attr]
        stats = configs.stats()
        assert stats["invalidations"] == 1 and stats["loads"] == 1 and stats["full_reloads"] == 1
        # A bulk change (over 100 enterprises in one statement) is one "reload all".
        add_enterprises(db_url, *(f"bulk{i}" for i in range(150)))
        await wait_until(lambda: len(configs.enabled_matrix()) == 152)
        assert configs.stats()["full_reloads"] == 2
        # Deleted: the next read knows.
        execute(db_url, "DELETE FROM dispatch.enterprises WHERE number = 'B'")
        await wait_until(lambda: configs.cached("B") == (False, None))
        assert await configs.get("B") is None


async def test_notifications_lost_while_the_listener_was_away_are_healed_by_the_reload(db_url: str) -> None:
    add_enterprises(db_url, "A")
    # TTL and periodic reload far away: only the reconnect can bring the change.
    async with cache_listening(db_url, ttl=3600, full_reload_every=(3600, 3600)) as (configs, listener):
        await configs.reload_all()
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        await wait_until(lambda: not listener.connected.is_set())
        set_enabled(db_url, "A", False)  # its NOTIFY reaches no one
        assert configs.cached("A")[1].enabled() == {"retailcrm": True}  # type: ignore[union-attr]
        await wait_until(lambda: configs.stats()["reconnects"] == 1)
        await wait_until(lambda: configs.cached("A")[0])
        assert configs.cached("A")[1].enabled() == {"retailcrm": False}  # type: ignore[union-attr]
        assert configs.stats()["full_reloads"] == 2


async def test_a_committed_change_reaches_every_listening_cache(db_url: str) -> None:
    """Four caches, each with its LISTEN connection (as four worker processes have): each
    forgets the changed enterprise; the time from commit to the last one is printed (the
    figure in the README comes from `pgdispatch bench --scenario calls`, across processes)."""
    add_enterprises(db_url, "A")
    async with cache_listening(db_url) as (c1, _), cache_listening(db_url) as (c2, _), \
            cache_listening(db_url) as (c3, _), cache_listening(db_url) as (c4, _):
        caches = [c1, c2, c3, c4]
        for cache in caches:
            await cache.reload_all()
        committed = time.perf_counter()
        set_enabled(db_url, "A", False)
        await wait_until(lambda: all(not c.cached("A")[0] for c in caches), every=0.001)
        print(f"commit -> 4 caches invalidated: {(time.perf_counter() - committed) * 1000:.1f} ms")
        for cache in caches:
            assert (await cache.get("A")).enabled() == {"retailcrm": False}  # type: ignore[union-attr]


async def test_a_full_reload_leaves_out_what_was_invalidated_while_it_read() -> None:
    values = {"a": 1, "b": 1}

    async def load(key: str) -> int:
        return values[key]

    cache: KeyedCache[str, int] = KeyedCache(load, ttl=3600)
    started = cache.generation
    snapshot = dict(values)  # read from the source...
    values["a"] = 2
    cache.invalidate("a")  # ...while "a" changed and was notified
    assert cache.replace_all(snapshot, started)
    assert cache.peek("b") == (True, 1) and cache.peek("a") == (False, None)
    assert await cache.get("a") == 2
    # A reload-all invalidation overtakes a full reload entirely.
    started = cache.generation
    cache.invalidate()
    assert not cache.replace_all({"a": 1, "b": 1}, started)
    assert cache.values() == []
