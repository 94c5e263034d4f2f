"""A claimed job, as executors see it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.adapt import Buffer
from psycopg.types.json import JsonbLoader

from pgdispatch.db.errors import PgDispatchError

ConnectionSource = Callable[[], AbstractAsyncContextManager[AsyncConnection[Any]]]

# Set for the task running an App's executor: the worker's pool for the App, or the connection
# of an inline drain. A context variable, so each job's task sees its own.
job_connections: ContextVar[ConnectionSource | None] = ContextVar("pgdispatch_job_connections",
                                                                  default=None)


@dataclass(slots=True)
class Job:
    id: int
    queue: str
    kind: str
    args: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    tenant: str | None
    run_at: datetime
    expire_at: datetime | None
    created_at: datetime
    lease_token: UUID
    expired: bool

    def connection(self) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A database connection for this job's own work, in a transaction of its own that
        commits when the block ends without an exception (`async with job.connection() as
        conn:`). In a worker it comes from a small per-process pool; under App.drain it is the
        drain's connection, inside a savepoint."""
        source = job_connections.get()
        if source is None:
            raise PgDispatchError("job.connection() is for executors registered on a pgdispatch.App")
        return source()


class UnreadableArgs(dict[str, Any]):
    """The args of a job that could not be decoded (10,000 nested arrays, written before the
    schema refused them): the job dies 'invalid' on its own instead of failing its batch."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class JobArgsLoader(JsonbLoader):
    """Decodes each job's args on its own: a failure becomes that job's UnreadableArgs, never
    an exception that fails the claim of its whole batch (and rescues it again and again)."""

    def load(self, data: Buffer) -> Any:
        try:
            return super().load(data)
        except (RecursionError, ValueError) as exc:
            return UnreadableArgs(f"{type(exc).__name__}: {str(exc)[:200]}")
