"""The console's database access: one transaction per page or action, with the console user
named in it (dispatch.console_user(): the SQL scopes an enterprise admin by it), JIT off (many
small index reads that the planner would compile for longer than they run) and a statement
timeout (a page never hangs on a lock)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import psycopg
from aiohttp import web
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgdispatch import sql
from pgdispatch.db.connections import ConnectionSettings, check_soon, open_pool
from pgdispatch.db.errors import DatabaseUnavailable, connection_lost, first_line, translate
from pgdispatch.worker.job import JobArgsLoader

log = logging.getLogger(__name__)

Row = dict[str, Any]
Cursor = psycopg.AsyncCursor[Row]


class ConsoleDatabase:
    def __init__(self, url: str, *, settings: ConnectionSettings, max_size: int = 8) -> None:
        self.pool: AsyncConnectionPool = open_pool(
            url,
            settings=settings,
            name="console",
            min_size=1,
            max_size=max_size,
            timeout=10,
            configure=_configure,
        )

    async def open(self) -> None:
        try:
            await self.pool.open(wait=True, timeout=15)
        except PoolTimeout:
            raise DatabaseUnavailable("database unavailable: no connection within 15s") from None

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self, user: str | None) -> AsyncIterator[Cursor]:
        """A cursor in a transaction of its own, committed when the block ends (rolled back on
        an error); driver errors come out translated (InvalidInput, NotFound, NotAllowed, ...)."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(sql.query("console_begin"), {"user": user or ""})
                yield cur
        except PoolTimeout:
            raise DatabaseUnavailable("database unavailable: no free connection within 10s") from None
        except psycopg.Error as exc:
            if connection_lost(exc):
                check_soon(self.pool)
                raise DatabaseUnavailable(f"database unavailable: {first_line(exc)}") from exc
            raise translate(exc) from exc

    async def rows(
        self, user: str | None, name: str, params: Mapping[str, Any] | None = None, *, fetch: bool = True
    ) -> list[Row]:
        """The named query's rows, in a transaction of its own (fetch=False: a statement that
        returns none)."""
        async with self.transaction(user) as cur:
            await cur.execute(sql.query(name), params or {})
            return await cur.fetchall() if fetch else []

    async def row(self, user: str | None, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
        async with self.transaction(user) as cur:
            await cur.execute(sql.query(name), params or {})
            return await cur.fetchone()

    async def superuser(self) -> bool:
        """Whether the console's login can do more than its role needs (a superuser)."""
        row = await self.row(None, "console_superuser")
        return bool(row and row["rolsuper"])


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # A job's args too deep to decode (from before the schema refused them) show as such.
    conn.adapters.register_loader("jsonb", JobArgsLoader)


DATABASE = web.AppKey("database", ConsoleDatabase)
