"""One dedicated LISTEN connection per worker process.

It reconnects with backoff after any failure, LISTENs again, and then calls `on_reconnect` so
the owner can do a full refresh: notifications sent while it was away are lost, and polling
plus that refresh are what keep the system correct. A periodic `SELECT 1` notices a server
that vanished without closing the socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from pgdispatch.db.connections import DIRECT, ConnectionSettings

log = logging.getLogger(__name__)

NotifyHandler = Callable[[str, str], None]


class Listener:
    def __init__(self, database_url: str, channels: list[str], *, on_notify: NotifyHandler,
                 on_reconnect: Callable[[], Awaitable[None]], keepalive: float = 5.0,
                 max_backoff: float = 5.0, connect_timeout: int = 10,
                 settings: ConnectionSettings = DIRECT) -> None:
        self._url = database_url
        self._settings = settings
        self._channels = channels
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._keepalive = keepalive
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.backend_pid: int | None = None  # the server process of the LISTEN connection

    async def run(self) -> None:
        """Listen until cancelled."""
        failures = 0
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._url, connect_timeout=self._connect_timeout, **self._settings.kwargs()) as conn:
                    for channel in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self.backend_pid = conn.info.backend_pid
                    self.connected.set()
                    if not first:
                        self.reconnects += 1
                        log.info("listener reconnected; refreshing")
                        await self._on_reconnect()
                    first = False
                    failures = 0
                    await self._receive(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                failures += 1
                delay = min(self._max_backoff, 0.1 * 2**failures)
                log.warning("listener connection lost (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def _receive(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        while True:
            async for note in conn.notifies(timeout=self._keepalive):
                self._on_notify(note.channel, note.payload)
            await conn.execute("SELECT 1")
