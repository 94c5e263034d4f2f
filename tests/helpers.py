"""Shared test helpers: run a worker in-process, wait for database conditions."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TypeVar

import psycopg
from aiohttp import web

from pgdispatch.worker.attempt import Executor
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.runner import Runner


def scalar(url: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(query, params).fetchone()
    return row[0] if row else None


def execute(url: str, query: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(query, params)


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> None:
    """wait_until for tests that drive subprocesses without an event loop."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def running_worker(url: str, executors: Mapping[str, Executor], **settings: Any
                         ) -> AsyncIterator[Runner]:
    settings.setdefault("rescue_interval", 0.2)
    runner = Runner(WorkerConfig(database_url=url, **settings), executors)
    task = asyncio.create_task(runner.run())
    started = asyncio.ensure_future(runner.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED, timeout=30)
    if task.done():
        task.result()
    try:
        yield runner
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=30)


@contextlib.asynccontextmanager
async def served(handle: Callable[[web.Request], Any], route: str = "/{tail:.*}") -> AsyncIterator[str]:
    """A local HTTP server (aiohttp) answering every method on `route` with `handle`; its URL."""
    app = web.Application()
    app.router.add_route("*", route, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


T = TypeVar("T")


@contextlib.contextmanager
def in_a_thread(context: contextlib.AbstractAsyncContextManager[T]) -> Iterator[T]:
    """An async context (a local fake server) entered on an event loop of its own in a thread,
    for code that runs its own loop (the CLI)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    value = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(10)
    try:
        yield value
    finally:
        asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run_cli(capsys: Any, *argv: str) -> tuple[int, str]:
    """`pgdispatch ARGV` in this process: its exit code and everything it printed."""
    from pgdispatch.console import main as cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse refuses a flag before main returns
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err
