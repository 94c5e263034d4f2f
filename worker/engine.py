"""The engine's conversation with PostgreSQL: claim, finish (batched), extend, rescue.

Every state change goes through the versioned SQL functions of sql/schema/01_engine.sql; this module only
binds parameters and batches. Executors never reach it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import args_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgdispatch import sql
from pgdispatch.db.connections import DIRECT, ConnectionSettings, check_soon
from pgdispatch.db.masking import mask_text
from pgdispatch.worker.job import Job, JobArgsLoader

log = logging.getLogger(__name__)

# Longest text we store per error: enough to diagnose, small enough to keep rows cheap.
MAX_ERROR_CHARS = 2000
# How long history maintenance waits for a lock before leaving the work to its next run. Bound
# by the client (psycopg cancels the statement on the server), not with SET lock_timeout: a
# session setting sent through a pooler in transaction mode stays on the server connection for
# whoever gets it next.
HISTORY_LOCK_SECONDS = 1.0
# Dead letters and retained idempotency keys deleted per statement when pruning.
PRUNE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Finish:
    """One outcome, in the form dispatch.finish_jobs_v1 takes it."""

    job_id: int
    token: UUID
    outcome: str  # completed | retry | dead | release
    delay: float | None = None
    reason: str | None = None
    error: str | None = None
    status: int | None = None
    detail: Mapping[str, Any] | None = None


class Engine:
    def __init__(self, pool: AsyncConnectionPool, *, database_url: str, worker_id: str,
                 version: int, lease_seconds: float, settings: ConnectionSettings = DIRECT) -> None:
        """`database_url`: where maintenance's own connections go (DDL outside a transaction:
        a direct URL, never a pooler in transaction mode)."""
        self._pool = pool
        self._conninfo = database_url
        self._settings = settings
        self.worker_id = worker_id
        self.version = version
        self.lease_seconds = lease_seconds

    async def claim(self, queue: str, kinds: list[str], max_jobs: int) -> list[Job]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=args_row(Job))  # columns in field order: no kwargs per row
            cur.adapters.register_loader("jsonb", JobArgsLoader)
            await cur.execute(sql.query("claim_jobs"), {
                "worker_id": self.worker_id, "queue": queue, "kinds": kinds,
                "version": self.version, "max_jobs": max_jobs,
                "lease_seconds": self.lease_seconds})
            return await cur.fetchall()

    async def finish(self, batch: list[Finish]) -> int:
        """Write a batch of outcomes in one statement; returns how many still held their lease."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("finish_jobs"), finish_params(batch))
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def extend_leases(self, tokens: list[UUID]) -> set[UUID]:
        """Extend our leases; returns the tokens we no longer hold."""
        if not tokens:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("extend_leases"), {
                "tokens": tokens, "lease_seconds": self.lease_seconds})
            return {row[0] for row in await cur.fetchall()}

    async def kinds_waiting_unknown(self, queues: list[str], kinds: list[str]) -> dict[str, int]:
        """Runnable jobs this worker leaves waiting (unknown kind or newer build), by kind."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query("kinds_waiting_unknown"), {
                "queues": queues, "kinds": kinds, "version": self.version})
            return {kind: int(n) for kind, n in await cur.fetchall()}

    async def rescue_expired(self, max_jobs: int = 1000) -> int:
        return await self._scalar("rescue_expired", {"max_jobs": max_jobs})

    async def newer_build_waiting(self, queues: list[str]) -> bool:
        return bool(await self._scalar("newer_build_waiting",
                                       {"queues": queues, "version": self.version}))

    async def ensure_history_partitions(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("ensure_history_partitions"))

    async def take_duty(self, duty: str, lease_seconds: float) -> bool:
        """Whether this worker holds `duty` (one of all workers does it) for the next lease."""
        return bool(await self._scalar("take_duty", {
            "duty": duty, "worker_id": self.worker_id, "lease_seconds": lease_seconds}))

    async def maintain(self, *, history_keep_seconds: float, dead_keep_seconds: float) -> int:
        """Partitions ahead, old history partitions dropped, old dead letters and retained
        idempotency keys pruned, every table registered in dispatch.retention pruned (each
        capability registers its own: the engine knows none of them), stopped workers
        forgotten. Returns partitions dropped.

        Never queues the outcome path behind a long reader: partitions are attached (SHARE
        UPDATE EXCLUSIVE, which writers do not wait for) a week before they are needed, and old
        ones are detached CONCURRENTLY, then dropped, each under a short lock_timeout; what
        cannot be done now is done by the next run."""
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("ensure_history_partitions"))
            cur = await conn.execute(sql.query("history_partitions_older_than"),
                                     {"keep_seconds": history_keep_seconds})
            old = await cur.fetchall()
            while True:  # batch by batch: each a short transaction
                cur = await conn.execute(sql.query("prune_dead"), {
                    "keep_seconds": dead_keep_seconds, "batch": PRUNE_BATCH})
                row = await cur.fetchone()
                if not row or row[0] < PRUNE_BATCH:
                    break
            cur = await conn.execute(sql.query("retention_names"))
            for (name,) in await cur.fetchall():
                await self._prune(conn, name)
            await conn.execute(sql.query("forget_stopped_workers"))
        dropped = 0
        for partition, detach_pending in old:
            try:
                await self._drop_history_partition(partition, detach_pending=detach_pending)
                dropped += 1
            except (psycopg.errors.LockNotAvailable, TimeoutError):
                log.info("history partition %s is in use; the next maintenance run drops it",
                         partition)
        return dropped

    async def _prune(self, conn: psycopg.AsyncConnection[Any], name: str) -> None:
        """One registered table, batch by batch (each a short transaction of its own), by index."""
        try:
            while True:
                cur = await conn.execute(sql.query("prune_retention"), {"name": name, "batch": PRUNE_BATCH})
                row = await cur.fetchone()
                if not row or row[0] < PRUNE_BATCH:
                    return
        except psycopg.Error as exc:  # one table's trouble never keeps the others unpruned
            log.warning("pruning %s failed: %s", name, exc)

    async def _drop_history_partition(self, partition: str, *, detach_pending: bool) -> None:
        # Its own connection (the direct URL, when there is one): DETACH CONCURRENTLY cannot run
        # in a transaction. A detach cut short stays pending: the next run finalizes it.
        name = pgsql.Identifier("dispatch", partition)
        async with await self._connect() as conn:
            mode = pgsql.SQL("FINALIZE" if detach_pending else "CONCURRENTLY")
            async with asyncio.timeout(HISTORY_LOCK_SECONDS):
                await conn.execute(pgsql.SQL("ALTER TABLE dispatch.job_history DETACH PARTITION {} {}")
                                   .format(name, mode))
            async with asyncio.timeout(HISTORY_LOCK_SECONDS):
                await conn.execute(pgsql.SQL("DROP TABLE {}").format(name))

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        return await psycopg.AsyncConnection.connect(self._conninfo, connect_timeout=10,
                                                     **self._settings.kwargs())

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    async def vacuum_jobs(self, *, min_dead_tuples: int) -> bool:
        """VACUUM the jobs table once dead row versions pile up. Returns whether it ran.

        A fast drain leaves a dead version per claim and per finish at the head of the claim
        index; autovacuum wakes at most once a minute, and until then every claim steps over
        them (a 1M-row drain fell from ~37,000 to ~27,000 jobs/s). Its own connection, so a long
        VACUUM never holds one the claim needs; SKIP_LOCKED, so it never waits for a lock.
        Without the right to vacuum (owner, or MAINTAIN on PostgreSQL 17+) the server skips it
        with a notice: harmless."""
        async with self._pool.connection() as conn:
            row = await (await conn.execute(sql.query("jobs_dead_tuples"))).fetchone()
        if row is None or row[0] < min_dead_tuples:
            return False
        async with await self._connect() as conn:
            await conn.execute(sql.query("vacuum_jobs"))
        return True

    async def register(self, *, queues: list[str], slots: int, kinds: list[str]) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("register_worker"), {
                "id": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                "version": self.version, "queues": queues, "slots": slots, "kinds": kinds,
                "lease_seconds": self.lease_seconds})
            cur = await conn.execute(sql.query("unpark_jobs"), {
                "kinds": kinds, "version": self.version, "queues": queues})
            row = await cur.fetchone()
        if row and row[0]:
            log.info("took back %d jobs parked for want of a worker that runs their kind", row[0])

    async def heartbeat(self, *, running: int, completed: int, retried: int, dead: int,
                        stats: Mapping[str, Any]) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("worker_heartbeat"), {
                "id": self.worker_id, "running": running, "completed": completed,
                "retried": retried, "dead": dead, "stats": Jsonb(stats)})

    async def notify_probe(self, payload: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(sql.query("notify_probe"), {"payload": payload})

    async def stopped(self) -> None:
        async with self._pool.connection(timeout=5) as conn:
            await conn.execute(sql.query("worker_stopped"), {"id": self.worker_id})
            await conn.execute(sql.query("release_duties"), {"worker_id": self.worker_id})

    async def _scalar(self, name: str, params: dict[str, object]) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql.query(name), params)
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0


class OutcomeWriter:
    """Batches outcomes: while one batch is being written, the next one fills up.

    No timer: under light load each outcome is written at once; under heavy load batches grow
    to what arrives during one round trip. A failed write (database restarting) is retried
    with backoff; outcomes whose lease expired meanwhile are ignored by the database, and their
    jobs are rescued and run again (at-least-once).
    """

    def __init__(self, engine: Engine, *, max_batch: int = 1000) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._pending: list[Finish] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.ignored = 0

    def add(self, finish: Finish) -> None:
        self._pending.append(finish)
        self._idle.clear()
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_leases(self) -> list[UUID]:
        """Leases of outcomes not written yet: the heartbeat keeps them alive, or a stalled
        writer would let a finished job be rescued and run again."""
        return [f.token for f in self._pending]

    async def drained(self) -> None:
        """Wait until every outcome added so far is written."""
        await self._idle.wait()

    async def run(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                self._idle.set()
                await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                try:
                    counted = await self._engine.finish(batch)
                except (psycopg.OperationalError, psycopg.InterfaceError, OSError, PoolTimeout) as exc:
                    check_soon(self._engine.pool)
                    failures += 1
                    delay = min(5.0, 0.05 * 2**failures)
                    log.warning("writing %d outcomes failed (%s); retrying in %.2fs",
                                len(batch), type(exc).__name__, delay)
                    await asyncio.sleep(delay)
                    continue
                except psycopg.Error as exc:
                    if no_history_partition(exc):
                        # Workers create partitions a week ahead: only a clock jump or a long
                        # outage gets here. Create them and write again.
                        log.warning("no job_history partition for now; creating partitions")
                        await self._engine.ensure_history_partitions()
                        continue
                    # Something in this batch the database refuses. Write one by one so a
                    # single bad outcome cannot block the others; a refused one stays leased
                    # and is rescued (run again) when its lease expires.
                    log.error("writing %d outcomes failed (%s); writing one by one",
                              len(batch), exc)
                    counted = await self._write_singly(batch)
                failures = 0
                del self._pending[: len(batch)]
                self.ignored += len(batch) - counted

    async def _write_singly(self, batch: list[Finish]) -> int:
        counted = 0
        for finish in batch:
            try:
                counted += await self._engine.finish([finish])
            except psycopg.Error as exc:
                log.error("outcome of job %s refused by the database: %s", finish.job_id, exc)
        return counted


def finish_params(batch: list[Finish]) -> dict[str, list[Any]]:
    """A batch of outcomes as the arrays dispatch.finish_jobs_v2 takes."""
    return {
        "ids": [f.job_id for f in batch],
        "tokens": [f.token for f in batch],
        "outcomes": [f.outcome for f in batch],
        # One type per array for the binary dump: executors give delays as int or float.
        "delays": [None if f.delay is None else float(f.delay) for f in batch],
        "reasons": [f.reason for f in batch],
        "errors": [_clip(f.error) for f in batch],
        "statuses": [f.status for f in batch],
        "details": [None if f.detail is None else Jsonb(f.detail) for f in batch],
    }


def no_history_partition(exc: psycopg.Error) -> bool:
    return isinstance(exc, psycopg.errors.CheckViolation) and "no partition of relation" in str(exc)


def _clip(text: str | None) -> str | None:
    """An error as it is stored: masked (an exception's text may quote a URL with its key),
    then cut."""
    if text is None:
        return None
    text = mask_text(text.replace("\x00", "\\0"))  # PostgreSQL text cannot hold NUL
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 1] + "…"
