"""Periodic commands (seed 001): registered on an App with a cron schedule, given one run per
tick across every worker and host by the unique (command, tick) row of dispatch.command_runs.

A run is a job of kind `command:<key>` (one attempt, the command's lock as its timeout), so its
lock is the job's lease: held with the worker's heartbeat, visible in dispatch.command_status,
shown as Locked when the worker died and the lease ran out. Ticks missed while no worker ran
are not made up: when workers come back, the latest missed tick gets one run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgdispatch import sql
from pgdispatch.db.errors import ConfigurationError

log = logging.getLogger(__name__)

KEY_FORMAT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
KIND_PREFIX = "command:"


@dataclass(frozen=True, slots=True)
class Command:
    key: str
    name: str
    schedule: str  # cron: 5 fields, or 6 with seconds last (croniter)
    args: tuple[Any, ...] = ()
    queue: str | None = None
    lock: float = 300.0  # seconds a run may take; the seed's bound

    def __post_init__(self) -> None:
        if not KEY_FORMAT.match(self.key):
            raise ConfigurationError(f"command key {self.key!r} must match {KEY_FORMAT.pattern}")
        if not croniter.is_valid(self.schedule):
            raise ConfigurationError(f"command {self.key!r}: {self.schedule!r} is not a cron schedule "
                                     "(5 fields, or 6 with seconds last, e.g. '*/5 * * * *')")
        if self.lock <= 0:
            raise ConfigurationError(f"command {self.key!r}: lock must be > 0 seconds, got {self.lock}")

    @property
    def kind(self) -> str:
        return KIND_PREFIX + self.key

    def latest_tick(self, now: datetime) -> datetime:
        """The last tick at or before `now` (ticks fall on whole seconds)."""
        after = now.replace(microsecond=0) + timedelta(seconds=1)
        tick: datetime = croniter(self.schedule, after).get_prev(datetime)
        return tick

    def next_tick(self, now: datetime) -> datetime:
        tick: datetime = croniter(self.schedule, now).get_next(datetime)
        return tick


async def register_commands(conn: AsyncConnection[Any], commands: Sequence[Command], now: datetime) -> None:
    """Record commands in dispatch.commands (the App does it when a worker starts)."""
    for c in commands:
        await conn.execute(sql.query("register_command"), {
            "key": c.key, "name": c.name, "args": Jsonb(list(c.args)), "schedule": c.schedule,
            "queue": c.queue, "lock_seconds": max(1, round(c.lock)), "next_tick": c.next_tick(now)})


class CommandScheduler:
    """Runs in every worker whose App has commands: each second it gives every due tick its run.
    Workers race for a tick; the (command, tick) key lets exactly one win."""

    def __init__(self, pool: AsyncConnectionPool, commands: Sequence[Command], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._pool = pool
        self._commands = {c.key: c for c in commands}
        self._clock = clock

    async def tick(self) -> None:
        async with self._pool.connection() as conn:
            # The clock is read once the connection is ours: a scheduler that waited for one
            # (the database restarting) schedules the tick due now, not the one due when it
            # began to wait (the latest due tick runs once; missed ones are not made up).
            now = self._clock()
            cur = await conn.execute(sql.query("command_ticks"), {"keys": list(self._commands)})
            last: dict[str, datetime | None] = dict(await cur.fetchall())
            for key, command in self._commands.items():
                due = command.latest_tick(now)
                given = last.get(key)
                if key not in last or (given is not None and due <= given):
                    continue
                cur = await conn.execute(sql.query("schedule_command"), {
                    "key": key, "tick": due, "next_tick": command.next_tick(now), "manual": False})
                row = await cur.fetchone()
                if row and row[0] is not None:
                    log.info("command %s: the run of %s is job %s", key, due.isoformat(), row[0])
