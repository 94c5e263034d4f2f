"""The App: where a user registers executors for kinds of their own, and what `pgdispatch worker
--app module:attribute` loads in every worker process."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar, overload

import psycopg

from pgdispatch import sql
from pgdispatch.db.errors import ConfigurationError
from pgdispatch.db.producer import NewJob, enqueue, start_process
from pgdispatch.worker.attempt import Executor
from pgdispatch.worker.commands import Command, register_commands
from pgdispatch.worker.inline import DrainResult, drain
from pgdispatch.worker.job import ConnectionSource, Job, job_connections
from pgdispatch.worker.outcome import Outcome, Retry
from pgdispatch.worker.processes import ProcessRunner, ProcessType

# The same rule as the job_kind_format constraint of dispatch.jobs.
KIND_FORMAT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
BUILT_IN_KINDS = frozenset({"http.request"})

F = TypeVar("F", bound=Callable[[Job], Awaitable[Outcome | None]])
C = TypeVar("C", bound=type)


@dataclass(frozen=True, slots=True)
class KindOptions:
    """Per-kind defaults. `queue`, `priority` and `max_attempts` apply to jobs enqueued through
    the App (app.enqueue, app.new_job); `timeout` (seconds) bounds every run of the executor,
    on top of its queue's job_timeout."""

    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    timeout: float | None = None


class App:
    """A registry of executors for the user's own kinds.

        app = pgdispatch.App()

        @app.executor("source.download", queue="source_download", timeout=60)
        async def download(job: pgdispatch.Job) -> pgdispatch.Outcome:
            ...
            return pgdispatch.Done()
    """

    def __init__(self, *, pool_size: int = 4) -> None:
        if pool_size < 1:
            raise ConfigurationError(f"App(pool_size=...) must be >= 1, got {pool_size}")
        # Connections per worker process for job.connection().
        self.pool_size = pool_size
        self._functions: dict[str, Callable[[Job], Awaitable[Outcome | None]]] = {}
        self._options: dict[str, KindOptions] = {}
        self._commands: dict[str, Command] = {}
        self._processes: dict[str, ProcessType] = {}

    def executor(self, kind: str, *, queue: str | None = None, priority: int | None = None,
                 max_attempts: int | None = None, timeout: float | None = None) -> Callable[[F], F]:
        """Register the decorated `async def f(job) -> Outcome` for `kind`. A raised exception
        is a retry with the error recorded; pgdispatch.InvalidJob dead-letters the job."""
        if not isinstance(kind, str) or not KIND_FORMAT.match(kind):
            raise ConfigurationError(f"kind {kind!r} must match {KIND_FORMAT.pattern} "
                                     "(letters, digits, _ . : -; at most 128)")
        if kind in BUILT_IN_KINDS or kind.startswith("debug."):
            raise ConfigurationError(f"kind {kind!r} is built into pgdispatch; choose another name")
        if kind in self._functions:
            raise ConfigurationError(f"kind {kind!r} is registered twice on this App")
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"timeout for {kind!r} must be > 0 seconds, got {timeout}")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigurationError(f"max_attempts for {kind!r} must be >= 1, got {max_attempts}")

        def register(fn: F) -> F:
            is_async = inspect.iscoroutinefunction(fn)  # (kept out of the if: it narrows fn's type)
            if not is_async:
                raise ConfigurationError(f"the executor for {kind!r} must be an async function (async def)")
            self._functions[kind] = fn
            self._options[kind] = KindOptions(queue, priority, max_attempts, timeout)
            return fn

        return register

    def command(self, key: str, name: str, *, schedule: str, args: Sequence[Any] = (),
                queue: str | None = None, lock: float = 300.0) -> Callable[[F], F]:
        """Register the decorated `async def f(job)` as the periodic command `key` (the seed's
        registerCommands): run once per tick of `schedule` (cron) across all workers, never two
        runs at once, each bounded by `lock` seconds. `job.args` is {"args": [...], "tick": ...,
        "manual": bool}."""
        command = Command(key, name, schedule, tuple(args), queue, lock)
        if key in self._commands:
            raise ConfigurationError(f"command {key!r} is registered twice on this App")
        register = self.executor(command.kind, queue=queue, max_attempts=1, timeout=lock)

        def add(fn: F) -> F:
            register(fn)
            self._commands[key] = command
            return fn

        return add

    def process(self, key: str, name: str, *, version: int, queue: str | None = None,
                max_attempts: int = 5, backoff: float = 60.0,
                step_timeout: float = 300.0) -> Callable[[C], C]:
        """Register the decorated class as the process type `key` (display name `name`, the
        seed's 'CREATE ORDER'). Its `steps` list names its steps in order: a method name, or
        (name, task class or async callable). Each step gets the state and returns StepDone,
        StepRetry or StepError. Bump `version` with every change to the steps."""
        def register(cls: C) -> C:
            ptype = ProcessType.of(cls, key=key, name=name, version=version, queue=queue,
                                   max_attempts=max_attempts, backoff=backoff, step_timeout=step_timeout)
            if key in self._processes or ptype.kind in self._functions:
                raise ConfigurationError(f"process type {key!r} is registered twice on this App")
            self._processes[key] = ptype
            self._functions[ptype.kind] = ProcessRunner(ptype)
            # The runner bounds each step itself (a job may run several steps in a row).
            self._options[ptype.kind] = KindOptions(queue, None, None, None)
            return cls

        return register

    @property
    def processes(self) -> list[ProcessType]:
        return list(self._processes.values())

    async def register(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Record this App's process types and commands in the database (workers do it at
        start; call it in a test that drains inline)."""
        for ptype in self._processes.values():
            await conn.execute(sql.query("register_process_type"), {
                "type": ptype.key, "name": ptype.name, "version": ptype.version,
                "steps": list(ptype.names), "queue": ptype.queue})
        await register_commands(conn, self.commands, datetime.now(UTC))

    @overload
    def start_process(self, conn: psycopg.Connection[Any], key: str, state: Mapping[str, Any] | None = None,
                      *, idempotency_key: str | None = None) -> int: ...
    @overload
    def start_process(self, conn: psycopg.AsyncConnection[Any], key: str,
                      state: Mapping[str, Any] | None = None, *,
                      idempotency_key: str | None = None) -> Awaitable[int]: ...
    def start_process(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], key: str,
                      state: Mapping[str, Any] | None = None, *,
                      idempotency_key: str | None = None) -> int | Awaitable[int]:
        """dispatch.start_process in the caller's transaction: the instance's id (the existing
        one's when the key is taken)."""
        return start_process(conn, key, state, idempotency_key=idempotency_key)

    @property
    def commands(self) -> list[Command]:
        """Every registered command."""
        return list(self._commands.values())

    @property
    def kinds(self) -> Mapping[str, KindOptions]:
        """Every registered kind and its options."""
        return MappingProxyType(self._options)

    def executors(self, connections: ConnectionSource) -> dict[str, Executor]:
        """The registered functions as the engine runs them, with job.connection() served
        from `connections` and each kind's timeout applied."""
        return {kind: _Bound(kind, fn, self._options[kind], connections)
                for kind, fn in self._functions.items()}

    def new_job(self, kind: str, args: Mapping[str, Any] | None = None, **columns: Any) -> NewJob:
        """A NewJob for enqueue_many with `kind`'s defaults; keyword arguments override them."""
        options = self._options_of(kind)
        defaults = {"queue": options.queue, "priority": options.priority,
                    "max_attempts": options.max_attempts}
        return NewJob(kind=kind, args=args or {}, **{**defaults, **columns})

    @overload
    def enqueue(self, conn: psycopg.Connection[Any], kind: str, args: Mapping[str, Any] | None = None, *,
                run_at: datetime | None = None, expire_at: datetime | None = None,
                idempotency_key: str | None = None, tenant: str | None = None,
                **overrides: Any) -> int: ...
    @overload
    def enqueue(self, conn: psycopg.AsyncConnection[Any], kind: str, args: Mapping[str, Any] | None = None,
                *, run_at: datetime | None = None, expire_at: datetime | None = None,
                idempotency_key: str | None = None, tenant: str | None = None,
                **overrides: Any) -> Awaitable[int]: ...
    def enqueue(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], kind: str,
                args: Mapping[str, Any] | None = None, *, run_at: datetime | None = None,
                expire_at: datetime | None = None, idempotency_key: str | None = None,
                tenant: str | None = None, **overrides: Any) -> int | Awaitable[int]:
        """pgdispatch.enqueue with `kind`'s registered queue, priority and max_attempts (which
        `queue=`, `priority=`, `max_attempts=` override). An unregistered kind is an error."""
        job = self.new_job(kind, args, **overrides)
        return enqueue(conn, kind, job.args, queue=job.queue, priority=job.priority,
                       run_at=run_at, expire_at=expire_at, max_attempts=job.max_attempts,
                       idempotency_key=idempotency_key, tenant=tenant)

    async def drain(self, conn: psycopg.AsyncConnection[Any], *, queues: Sequence[str] | None = None,
                    with_scheduled: bool = False, max_jobs: int = 10_000) -> DrainResult:
        """Run, in this process and on `conn` (inside its transaction, so uncommitted jobs
        count), every job of this App's kinds that is runnable now, including the ones those
        jobs enqueue, until none is left. `with_scheduled` also runs jobs whose run_at lies
        ahead, retries included (until their attempts run out). For tests: no worker needed."""
        await self.register(conn)
        # connections=None: the drain serves job.connection() itself, from `conn`.
        executors = {kind: _Bound(kind, fn, self._options[kind], None)
                     for kind, fn in self._functions.items()}
        return await drain(conn, executors, queues=queues, with_scheduled=with_scheduled,
                           max_jobs=max_jobs)

    def _options_of(self, kind: str) -> KindOptions:
        try:
            return self._options[kind]
        except KeyError:
            raise ConfigurationError(f"kind {kind!r} is not registered on this App "
                                     f"(registered: {', '.join(sorted(self._options)) or 'none'})") from None


class _Bound:
    """A user's function as the engine calls it."""

    __slots__ = ("connections", "fn", "kind", "options")

    def __init__(self, kind: str, fn: Callable[[Job], Awaitable[Outcome | None]], options: KindOptions,
                 connections: ConnectionSource | None) -> None:
        self.kind, self.fn, self.options, self.connections = kind, fn, options, connections

    async def __call__(self, job: Job) -> Outcome | None:
        # Each job runs in a task of its own, so this setting is seen by this job only.
        token = job_connections.set(self.connections) if self.connections is not None else None
        try:
            timeout = self.options.timeout
            if timeout is None:
                return await self.fn(job)
            scope = asyncio.timeout(timeout)
            try:
                async with scope:
                    return await self.fn(job)
            except TimeoutError:
                if not scope.expired():
                    raise  # the job's own timeout error: a retry with that error, as usual
                return Retry(error=f"timed out after {timeout:g}s (timeout of kind {self.kind})")
        finally:
            if token is not None:
                job_connections.reset(token)


def load_app(spec: str) -> App:
    """The App named by `module:attribute` (the `--app` option). The current directory is
    searched first, as uvicorn and gunicorn do. Every failure is one ConfigurationError line."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r} must be module:attribute, e.g. myproject.jobs:app")
    if "/" in module_name or module_name.endswith(".py"):
        parts = [p for p in module_name.removesuffix(".py").split("/") if p not in ("", ".")]
        dotted = ".".join(parts)
        raise ConfigurationError(f"--app {spec!r}: give a module name, not a file path "
                                 f"(--app {dotted}:{attribute})")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error in it is theirs to read, in one line
        where = ""
        if isinstance(exc, SyntaxError) and exc.filename:
            where = f" ({exc.filename}, line {exc.lineno})"
        raise ConfigurationError(f"--app {spec}: cannot import {module_name}: "
                                 f"{type(exc).__name__}: {exc}{where}") from None
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"--app {spec}: module {module_name} has no attribute {attribute!r}") from None
    if not isinstance(app, App):
        raise ConfigurationError(f"--app {spec}: {attribute} is a {type(app).__name__}, not a pgdispatch.App")
    return app
