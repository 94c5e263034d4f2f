"""The worker pool: N worker processes, restarted when they crash, stopped gracefully.

Exit codes of the pool: 0 when stopped or drained, EXIT_NEWER_BUILD when a child saw jobs of a
newer build (the supervisor should start the new code), 1 when children keep crashing at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from pgdispatch.db.errors import ConfigurationError
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.process import child_main
from pgdispatch.worker.runner import (
    EXIT_NEWER_BUILD,
    EXIT_NO_DATABASE,
    EXIT_OK,
    EXIT_RECYCLE,
    EXIT_SCHEMA_MISSING,
)

if TYPE_CHECKING:
    from pgdispatch.worker.ops_http import OpsServer

log = logging.getLogger(__name__)

_spawn = multiprocessing.get_context("spawn")


@dataclass
class ChildState:
    process: BaseProcess
    started: float = field(default_factory=time.monotonic)


class WorkerPool:
    def __init__(self, config: WorkerConfig, *, processes: int = 1, time_limit: float = 0,
                 http_port: int | None = None, log_level: int = logging.INFO,
                 log_format: str = "text") -> None:
        if processes < 1:
            raise ConfigurationError(f"processes must be >= 1, got {processes}")
        self.config = config
        self.processes = processes
        self.time_limit = time_limit
        self.http_port = http_port
        self.log_level = log_level
        self.log_format = log_format
        self._metrics_dir: str | None = None
        self.children: dict[int, ChildState] = {}
        self.restarts = 0
        self.started_at = time.monotonic()
        self._stopping = False
        self._stop_deadline = 0.0
        self._exit_code = EXIT_OK
        self._quick_crashes = 0

    def signalled(self) -> None:
        """SIGTERM / Ctrl-C: the first stops gracefully, a second tells every worker to release
        its running jobs at once."""
        if self._stopping:
            log.warning("second signal: workers release their running jobs now")
            self._signal_children(signal.SIGUSR1)
            return
        log.warning("stopping: workers finish their running jobs within %gs "
                    "(signal again to release them now)", self.config.grace_seconds)
        self.stop()

    def _signal_children(self, signum: int = signal.SIGTERM) -> None:
        for child in self.children.values():
            if child.process.is_alive() and child.process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signum)

    def stop(self, exit_code: int = EXIT_OK) -> None:
        if self._stopping:
            return
        log.info("pool stopping: SIGTERM to %d workers", len(self.children))
        self._stopping = True
        self._exit_code = exit_code
        self._stop_deadline = time.monotonic() + self.config.grace_seconds + 10
        self._signal_children()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.signalled)
        loop.add_signal_handler(signal.SIGINT, self.signalled)
        ops = None
        if self.http_port is not None:
            from pgdispatch.worker.ops_http import OpsServer

            # The children count their attempts in files here (prometheus_client's multiprocess
            # mode); /metrics serves their sum, kept across a child's restart.
            self._metrics_dir = tempfile.mkdtemp(prefix="pgdispatch-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
            ops = OpsServer(self.config.database_url, self.info, port=self.http_port,
                            metrics_dir=self._metrics_dir)
            try:
                await ops.start()
            except OSError as exc:
                raise ConfigurationError(
                    f"--http-port {self.http_port}: {exc.strerror or exc} "
                    "(is another pool running? choose another port)") from None
        redirects = None if ops is None else asyncio.create_task(self._serve_redirects(ops))
        for slot in range(self.processes):
            self._spawn(slot)
        try:
            while self.children:
                await asyncio.sleep(0.1)
                self._reap()
                if self.time_limit and not self._stopping and \
                        time.monotonic() - self.started_at >= self.time_limit:
                    log.info("time limit of %gs reached", self.time_limit)
                    self.stop()
                if self._stopping and time.monotonic() > self._stop_deadline:
                    for child in self.children.values():
                        log.error("worker pid %s did not stop in time: killing it",
                                  child.process.pid)
                        child.process.kill()
        finally:
            if redirects is not None:
                redirects.cancel()
                await asyncio.gather(redirects, return_exceptions=True)
            if ops is not None:
                await ops.stop()
            if self._metrics_dir is not None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return self._exit_code

    async def _serve_redirects(self, ops: OpsServer) -> None:
        from pgdispatch.worker.smart_redirect import smart_redirect_service

        async with smart_redirect_service(self.config) as redirect:
            ops.redirect = redirect
            await asyncio.Event().wait()  # until the pool stops

    def info(self) -> dict[str, object]:
        """This pool's processes, for /health and /stats."""
        return {
            "processes": self.processes,
            "alive": sum(c.process.is_alive() for c in self.children.values()),
            "pids": [c.process.pid for c in self.children.values()],
            "restarts": self.restarts,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
        }

    def _spawn(self, slot: int) -> None:
        process = _spawn.Process(target=child_main,
                                 args=(self.config, self.log_level, os.getpid(), self.log_format),
                                 name=f"pgdispatch-worker-{slot}", daemon=False)
        process.start()
        self.children[slot] = ChildState(process)
        log.info("worker %d started (pid %s)", slot, process.pid)

    def _reap(self) -> None:
        for slot, child in list(self.children.items()):
            if child.process.is_alive():
                continue
            child.process.join()
            code = child.process.exitcode
            del self.children[slot]
            if self._metrics_dir is not None and child.process.pid:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(child.process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stopping:
                continue
            if code == EXIT_NEWER_BUILD:
                self.stop(EXIT_NEWER_BUILD)
            elif code == EXIT_NO_DATABASE:
                log.error("worker %d could not reach the database: stopping the pool", slot)
                self.stop(EXIT_NO_DATABASE)
            elif code == EXIT_SCHEMA_MISSING:
                log.error("worker %d found no usable schema (run: pgdispatch migrate): stopping the pool",
                          slot)
                self.stop(1)
            elif code == EXIT_OK and self.config.drain:
                continue
            elif code == EXIT_RECYCLE:
                log.info("worker %d recycled (memory limit); starting a fresh one", slot)
                self._spawn(slot)
            else:
                lived = time.monotonic() - child.started
                self._quick_crashes = self._quick_crashes + 1 if lived < 5 else 0
                if self._quick_crashes >= 5 * self.processes:
                    log.error("workers keep crashing at start (last exit code %s): giving up",
                              code)
                    self.stop(1)
                    continue
                self.restarts += 1
                log.error("worker %d (pid %s) died with exit code %s; restarting it", slot,
                          child.process.pid, code)
                self._spawn(slot)
