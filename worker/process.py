"""Entry point of one worker process: executors wired to a Runner, signals, the event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from worker.config import WorkerConfig
from worker.executors import builtin_executors
from worker.runner import Runner

log = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> int:
    """Run one worker in this process until drained or signalled; returns its exit code."""
    runner = Runner(config, builtin_executors())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, runner.stop)
    loop.add_signal_handler(signal.SIGINT, runner.stop)
    try:
        return await runner.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)


def child_main(config: WorkerConfig, log_level: int) -> None:
    """Target of a pool child process."""
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    sys.exit(run_event_loop(run_worker(config)))


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop (faster callbacks and I/O), or asyncio's loop where it is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    return uvloop.run(main)
