"""Running jobs in-process, on the caller's connection and inside its transaction: how a user's
test suite runs what its code enqueued without a worker process (seed 003's `sync://` mode).

Jobs run one at a time, in claim order, through the same attempt and finish code as the worker,
so retries, dead letters and history come out as a worker would leave them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import class_row

from pgdispatch import sql
from pgdispatch.db.errors import PgDispatchError, translated
from pgdispatch.notify.queue_policies import QueuePolicy
from pgdispatch.worker.attempt import Executor, Tally, finish_for, run_attempt
from pgdispatch.worker.engine import Finish, finish_params, no_history_partition
from pgdispatch.worker.job import Job, JobArgsLoader, job_connections
from pgdispatch.worker.outcome import Outcome


@dataclass(slots=True)
class DrainResult(Tally):
    """What a drain ran: counts by outcome, and every attempt in the order it ran."""

    attempts: list[tuple[Job, Outcome]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.attempts)


async def drain(conn: psycopg.AsyncConnection[Any], executors: Mapping[str, Executor], *,
                queues: Sequence[str] | None, with_scheduled: bool, max_jobs: int) -> DrainResult:
    if not isinstance(conn, psycopg.AsyncConnection):
        raise PgDispatchError(f"drain needs a psycopg.AsyncConnection, got {type(conn).__name__}")
    result = DrainResult()
    if not executors:
        return result
    policies = await _policies(conn)
    worker_id = f"inline:{os.getpid()}"

    @asynccontextmanager
    async def savepoint() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with conn.transaction():
            yield conn

    while True:
        job = await _claim(conn, worker_id, list(executors), queues, with_scheduled)
        if job is None:
            return result
        if result.total >= max_jobs:
            raise PgDispatchError(f"drain stopped after {max_jobs} jobs (max_jobs): "
                                  "does a job keep enqueueing more of itself?")
        policy = policies.get(job.queue)
        token = job_connections.set(savepoint)
        try:
            outcome = await run_attempt(executors[job.kind], job, policy.job_timeout if policy else None)
        finally:
            job_connections.reset(token)
        finish = finish_for(job, outcome, policy)
        await _finish(conn, finish)
        result.attempts.append((job, outcome))
        result.count(job, finish)


async def _policies(conn: psycopg.AsyncConnection[Any]) -> dict[str, QueuePolicy]:
    with translated():
        cur = conn.cursor(row_factory=class_row(QueuePolicy))
        await cur.execute(sql.query("load_queues"))
        return {p.name: p for p in await cur.fetchall()}


async def _claim(conn: psycopg.AsyncConnection[Any], worker_id: str, kinds: list[str],
                 queues: Sequence[str] | None, with_scheduled: bool) -> Job | None:
    with translated():
        cur = conn.cursor(row_factory=class_row(Job))
        cur.adapters.register_loader("jsonb", JobArgsLoader)
        await cur.execute(sql.query("claim_inline"), {
            "worker_id": worker_id, "kinds": kinds, "queues": list(queues) if queues else None,
            "with_scheduled": with_scheduled})
        return await cur.fetchone()


async def _finish(conn: psycopg.AsyncConnection[Any], finish: Finish) -> None:
    with translated():
        try:
            async with conn.transaction():
                await conn.execute(sql.query("finish_jobs"), finish_params([finish]))
        except psycopg.Error as exc:
            if not no_history_partition(exc):
                raise
            # A database migrated long ago with no worker since: no partition for today yet.
            await conn.execute(sql.query("ensure_history_partitions"))
            await conn.execute(sql.query("finish_jobs"), finish_params([finish]))
