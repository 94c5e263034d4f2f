"""How pgdispatch connects: one set of settings for every connection it opens, and what the loss
of its own database means to the code that was using it.

Behind a pooler in transaction mode (PgBouncer `pool_mode = transaction`), consecutive
transactions of one client land on different server connections. psycopg prepares a statement
after it has run five times; the next execution may then reach a server connection where that
statement does not exist ("prepared statement _pg3_0 does not exist"), or where another client's
statement of that name does ("bind message supplies 6 parameters, but prepared statement _pg3_0
requires 1"). `transaction_pooler` turns automatic preparing off on every connection. A URL
cannot say it (libpq has no such parameter): it is `pgdispatch worker --transaction-pooler`,
`PGDISPATCH_TRANSACTION_POOLER=1`, or `ConnectionSettings(transaction_pooler=True)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgdispatch.db.errors import DatabaseUnavailable, connection_lost, first_line

log = logging.getLogger(__name__)

Source = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


@dataclass(frozen=True, kw_only=True)
class ConnectionSettings:
    # Every connection without prepared statements, for a pooler in transaction mode.
    transaction_pooler: bool = False

    def kwargs(self, *, autocommit: bool = True) -> dict[str, Any]:
        """The connection keyword arguments (psycopg.connect, a pool's `kwargs`)."""
        settings: dict[str, Any] = {"autocommit": autocommit}
        if self.transaction_pooler:
            settings["prepare_threshold"] = None
        return settings


DIRECT = ConnectionSettings()


def open_pool(url: str, *, settings: ConnectionSettings, name: str, min_size: int, max_size: int,
              autocommit: bool = True, **options: Any) -> AsyncConnectionPool:
    """A pool (not opened yet) whose connections all follow `settings`."""
    return AsyncConnectionPool(url, min_size=min_size, max_size=max_size, open=False, name=name,
                               kwargs=settings.kwargs(autocommit=autocommit), **options)


_checking: weakref.WeakKeyDictionary[AsyncConnectionPool, asyncio.Task[None]] = weakref.WeakKeyDictionary()


def check_soon(pool: AsyncConnectionPool) -> None:
    """Check the pool's idle connections in the background (one check at a time per pool):
    after a server restart every idle connection is dead, and each would otherwise fail the
    next caller that gets it."""
    running = _checking.get(pool)
    if running is not None and not running.done():
        return
    _checking[pool] = asyncio.ensure_future(_check(pool))


async def _check(pool: AsyncConnectionPool) -> None:
    with contextlib.suppress(Exception):
        await pool.check()


def guarded(pool: AsyncConnectionPool) -> Source:
    """`pool.connection`, where losing our own database (a restart, a pool timeout) is raised
    as DatabaseUnavailable, whether it happens getting the connection or using it: code above
    can tell it from a query's own failure (a job never pays an attempt for it). The pool's
    other connections are checked at once."""
    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
        except psycopg.Error as exc:
            if not connection_lost(exc):
                raise
            check_soon(pool)
            raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc

    return connection


@contextlib.contextmanager
def own_database() -> Any:
    """Around reads of our own database made through code that takes no Source (caches):
    the loss of the database is raised as DatabaseUnavailable."""
    try:
        yield
    except PoolTimeout as exc:
        raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
    except psycopg.Error as exc:
        if not connection_lost(exc):
            raise
        raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
