"""Enqueueing from Python, on a psycopg connection the caller owns: the job commits or rolls back
with the caller's transaction. Sync and async connections take the same calls."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, overload

import psycopg
from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.db.errors import InvalidInput, translated

TRACEPARENT = "_traceparent"
try:  # optional: pip install 'pgdispatch[otel]'
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator: Any = TraceContextTextMapPropagator()
except ImportError:  # pragma: no cover - depends on the extra
    _propagator = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewJob:
    """One job to insert with enqueue_many. None leaves a column to its default (queue
    'default', priority 0, run now, no expiry, the queue's max_attempts, no key, no tenant)."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: datetime | None = None
    expire_at: datetime | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None
    tenant: str | None = None


@overload
def enqueue(conn: psycopg.Connection[Any], kind: str, args: Mapping[str, Any] | None = None, *,
            queue: str | None = None, priority: int | None = None, run_at: datetime | None = None,
            expire_at: datetime | None = None, max_attempts: int | None = None,
            idempotency_key: str | None = None, tenant: str | None = None) -> int: ...
@overload
def enqueue(conn: psycopg.AsyncConnection[Any], kind: str, args: Mapping[str, Any] | None = None, *,
            queue: str | None = None, priority: int | None = None, run_at: datetime | None = None,
            expire_at: datetime | None = None, max_attempts: int | None = None,
            idempotency_key: str | None = None, tenant: str | None = None) -> Awaitable[int]: ...
def enqueue(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], kind: str,
            args: Mapping[str, Any] | None = None, *, queue: str | None = None,
            priority: int | None = None, run_at: datetime | None = None,
            expire_at: datetime | None = None, max_attempts: int | None = None,
            idempotency_key: str | None = None, tenant: str | None = None) -> int | Awaitable[int]:
    """Insert one job in the caller's transaction; returns its id. When `idempotency_key` is
    already taken in that queue (a live job, or one finished within the queue's dedupe window),
    nothing is inserted and the existing job's id is returned. With an AsyncConnection, await it."""
    params = {"kind": kind, "args": _json(_traced(args)), "queue": queue, "priority": priority,
              "run_at": run_at, "expire_at": expire_at, "max_attempts": max_attempts,
              "idempotency_key": idempotency_key, "tenant": tenant}
    if isinstance(conn, psycopg.AsyncConnection):
        return _enqueue_async(conn, params)
    with translated():
        row = conn.execute(sql.query("enqueue"), params).fetchone()
    return _id(row)


async def _enqueue_async(conn: psycopg.AsyncConnection[Any], params: dict[str, Any]) -> int:
    with translated():
        cur = await conn.execute(sql.query("enqueue"), params)
        row = await cur.fetchone()
    return _id(row)


@overload
def enqueue_many(conn: psycopg.Connection[Any], jobs: Iterable[NewJob]) -> list[int]: ...
@overload
def enqueue_many(conn: psycopg.AsyncConnection[Any], jobs: Iterable[NewJob]) -> Awaitable[list[int]]: ...
def enqueue_many(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
                 jobs: Iterable[NewJob]) -> list[int] | Awaitable[list[int]]:
    """Insert many jobs in one statement (one round trip, one wake-up per queue) in the caller's
    transaction; returns the ids of the jobs inserted, in order. A job whose idempotency key is
    taken is skipped. With an AsyncConnection, await it."""
    params = _columns(list(jobs))
    if isinstance(conn, psycopg.AsyncConnection):
        return _enqueue_many_async(conn, params)
    if params is None:
        return []
    with translated():
        rows = conn.execute(sql.query("enqueue_many"), params).fetchall()
    return [int(r[0]) for r in rows]


async def _enqueue_many_async(conn: psycopg.AsyncConnection[Any], params: dict[str, Any] | None) -> list[int]:
    if params is None:
        return []
    with translated():
        cur = await conn.execute(sql.query("enqueue_many"), params)
        rows = await cur.fetchall()
    return [int(r[0]) for r in rows]


def _columns(jobs: list[NewJob]) -> dict[str, Any] | None:
    """The jobs as one array per column: the statement unnests them server-side."""
    if not jobs:
        return None
    for i, job in enumerate(jobs):
        if not isinstance(job, NewJob):
            raise InvalidInput(f"enqueue_many: item {i} is a {type(job).__name__}, not a pgdispatch.NewJob")
    return {"kinds": [j.kind for j in jobs], "args": [_json(_traced(j.args)) for j in jobs],
            "queues": [j.queue for j in jobs], "priorities": [j.priority for j in jobs],
            "run_ats": [j.run_at for j in jobs], "expire_ats": [j.expire_at for j in jobs],
            "max_attempts": [j.max_attempts for j in jobs],
            "keys": [j.idempotency_key for j in jobs], "tenants": [j.tenant for j in jobs]}


def _traced(args: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The args, with the producer's trace context (W3C traceparent, key `_traceparent`) when it
    runs under an OpenTelemetry span: the attempts' spans join its trace (worker/telemetry.py)."""
    if _propagator is None or (args is not None and not isinstance(args, Mapping)):
        return args
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    if "traceparent" not in carrier or (args is not None and TRACEPARENT in args):
        return args
    return {**(args or {}), TRACEPARENT: carrier["traceparent"]}


def _json(args: Mapping[str, Any] | None) -> Jsonb:
    # Anything but an object is the database's to refuse (job_args_must_be_a_json_object).
    if args is None:
        return Jsonb({})
    return Jsonb(dict(args) if isinstance(args, Mapping) and not isinstance(args, dict) else args)


def _id(row: tuple[Any, ...] | None) -> int:
    if row is None or row[0] is None:  # the key was taken by a job that has since gone
        raise InvalidInput("enqueue: the idempotency key is taken by a job that no longer exists")
    return int(row[0])


@overload
def start_process(conn: psycopg.Connection[Any], process_type: str, state: Mapping[str, Any] | None = None,
                  *, idempotency_key: str | None = None) -> int: ...
@overload
def start_process(conn: psycopg.AsyncConnection[Any], process_type: str,
                  state: Mapping[str, Any] | None = None, *,
                  idempotency_key: str | None = None) -> Awaitable[int]: ...
def start_process(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], process_type: str,
                  state: Mapping[str, Any] | None = None, *,
                  idempotency_key: str | None = None) -> int | Awaitable[int]:
    """Start an instance of a process type in the caller's transaction (dispatch.start_process):
    its id, or the existing instance's when `idempotency_key` is taken for that type."""
    params = {"type": process_type, "state": _json(state), "idempotency_key": idempotency_key}
    if isinstance(conn, psycopg.AsyncConnection):
        return _start_async(conn, params)
    with translated():
        row = conn.execute(sql.query("start_process"), params).fetchone()
    return _id(row)


async def _start_async(conn: psycopg.AsyncConnection[Any], params: dict[str, Any]) -> int:
    with translated():
        cur = await conn.execute(sql.query("start_process"), params)
        row = await cur.fetchone()
    return _id(row)
