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
from worker.executors.breakers import Breakers
from worker.executors.http_transport import HttpTransport
from worker.executors.signing import SigningKeys
from worker.runner import Runner

log = logging.getLogger(__name__)


async def run_worker(config: WorkerConfig) -> int:
    """Run one worker in this process until drained or signalled; returns its exit code."""
    keys = SigningKeys(config.database_url)
    async with HttpTransport(max_connections=max(config.concurrency, 10),
                             allow_private_networks=config.allow_private_networks) as http:
        runner = Runner(config, builtin_executors(
            http=http, keys=keys, per_host_limit=config.per_host_limit,
            allow_private_networks=config.allow_private_networks,
            breakers=Breakers(failures=config.breaker_failures, cooldown=config.breaker_cooldown)),
            on_config_change=keys.invalidate)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, runner.stop)
        loop.add_signal_handler(signal.SIGINT, runner.stop)
        if _stop_requested_early:
            runner.stop()
        try:
            return await runner.run()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
            await keys.close()


_stop_requested_early = False


def _remember_stop(signum: int, frame: object) -> None:
    global _stop_requested_early
    _stop_requested_early = True


def child_main(config: WorkerConfig, log_level: int) -> None:
    """Target of a pool child process."""
    # A SIGTERM that arrives while the process is still starting must stop it cleanly too.
    signal.signal(signal.SIGTERM, _remember_stop)
    signal.signal(signal.SIGINT, _remember_stop)
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
