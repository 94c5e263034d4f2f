"""Entry point of one worker process: executors wired to a Runner, signals, the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import psycopg

from pgdispatch.db.connections import guarded, open_pool
from pgdispatch.db.errors import DatabaseUnavailable, SchemaMissing, translate
from pgdispatch.worker.app import load_app
from pgdispatch.worker.commands import CommandScheduler
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors import builtin_executors
from pgdispatch.worker.executors.context import executor_context, on_config_change
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.runner import EXIT_NO_DATABASE, EXIT_SCHEMA_MISSING, Runner, new_worker_id
from pgdispatch.worker.services import periodic
from pgdispatch.worker.telemetry import configure_logging

log = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig, *, parent_pid: int | None = None) -> int:
    """Run one worker in this process until drained or signalled; returns its exit code.
    With `parent_pid`, the worker also stops when that process is gone (the pool was killed)."""
    destinations = Destinations(allow_private=config.allow_private_networks,
                                allowed=config.allowed_destinations)
    # One name for this process in dispatch.workers and as the holder of its shared-limit slots.
    config = dataclasses.replace(config, worker_name=config.worker_name or new_worker_id())
    async with contextlib.AsyncExitStack() as stack:
        context = await stack.enter_async_context(executor_context(
            config.database_url, destinations=destinations, max_connections=max(config.concurrency, 10),
            per_host_limit=config.per_host_limit, breaker_failures=config.breaker_failures,
            breaker_cooldown=config.breaker_cooldown, slot_lease=config.lease_seconds,
            holder=config.worker_name, settings=config.connections))
        integrations = context.integrations
        assert integrations is not None
        refreshing = asyncio.create_task(integrations.reload_forever(), name="integration-configs")
        stack.push_async_callback(_cancelled, refreshing)

        def stats() -> dict[str, Any]:
            return {"signing_key_cache": context.keys.stats(), "limits": context.limits.stats(),
                    "integration_config_cache": integrations.stats()}

        executors = builtin_executors(context, debug_kinds=config.debug_kinds)
        if config.app is not None:
            app = load_app(config.app)
            # job.connection() for the App's executors: connections of their own, so claims and
            # outcomes never wait behind the user's queries. Opened in the background.
            app_pool = open_pool(config.database_url, settings=config.connections, name="app", min_size=1,
                                 max_size=app.pool_size, autocommit=False)
            await app_pool.open(wait=False)
            stack.push_async_callback(app_pool.close)
            # guarded: a job whose query loses our database (a restart) is postponed, its
            # attempt not counted.
            executors.update(app.executors(guarded(app_pool)))
            async with app_pool.connection() as conn:
                await app.register(conn)
            if app.commands:
                scheduler = CommandScheduler(app_pool, app.commands)
                ticking = asyncio.create_task(periodic("command scheduler", 1.0, scheduler.tick),
                                              name="command-scheduler")
                stack.push_async_callback(_cancelled, ticking)
        runner = Runner(config, executors, on_config_change=functools.partial(on_config_change, context),
                        stats=stats)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, runner.signalled)
        # A pool's child ignores SIGINT: a terminal's Ctrl-C reaches the whole process group,
        # and the pool relays it (a SIGTERM, then SIGUSR1 for a second Ctrl-C). Taking it here
        # too would make the relayed SIGTERM a second signal, and release running jobs at once.
        signals = (signal.SIGTERM, signal.SIGUSR1) if parent_pid is not None else (
            signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        if parent_pid is None:
            loop.add_signal_handler(signal.SIGINT, runner.signalled)
        # From the pool on its second signal: a second SIGTERM sent right after the first could
        # merge with it (the kernel does not queue standard signals).
        loop.add_signal_handler(signal.SIGUSR1, runner.release_now)
        if _stop_requested_early:
            runner.stop()
        orphan_watch = (asyncio.create_task(_stop_when_orphaned(runner, parent_pid))
                        if parent_pid is not None else None)
        try:
            return await runner.run()
        finally:
            if orphan_watch is not None:
                orphan_watch.cancel()
            for signum in signals:
                loop.remove_signal_handler(signum)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stop_when_orphaned(runner: Runner, parent_pid: int) -> None:
    # PR_SET_PDEATHSIG covers Linux at once; this covers the rest, and a parent that died before
    # the child could ask for the signal.
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            break
    log.error("the worker pool (pid %d) is gone: stopping", parent_pid)
    runner.stop()


_stop_requested_early = False


def _remember_stop(signum: int, frame: object) -> None:
    global _stop_requested_early
    _stop_requested_early = True


def child_main(config: WorkerConfig, log_level: int, parent_pid: int, log_format: str = "text") -> None:
    """Target of a pool child process."""
    # A SIGTERM that arrives while the process is still starting must stop it cleanly too.
    signal.signal(signal.SIGTERM, _remember_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool's to handle (see run_worker)
    signal.signal(signal.SIGUSR1, _remember_stop)
    _term_when_parent_dies()
    configure_logging(log_level, log_format)
    try:
        code = run_event_loop(run_worker(config, parent_pid=parent_pid))
    except DatabaseUnavailable as exc:
        log.error("%s", exc)  # one line: the pool reports it and exits with the same code
        code = EXIT_NO_DATABASE
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, SchemaMissing) as exc:
        # The schema is gone, or older than this code (dropped, or a migration not run): one
        # line, and the pool stops instead of restarting this process again and again.
        log.error("%s", translate(exc) if isinstance(exc, psycopg.Error) else exc)
        code = EXIT_SCHEMA_MISSING
    sys.exit(code)


def _term_when_parent_dies() -> None:
    """Linux: the kernel sends SIGTERM when the pool process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop (faster callbacks and I/O), or asyncio's loop where it is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    return uvloop.run(main)
