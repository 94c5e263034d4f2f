"""What a job costs, beside the rate: CPU of the worker processes and of the PostgreSQL backends
serving them, WAL bytes and rows written per job, and database round trips per job.

CPU comes from the processes' own counters (psutil, /proc), sampled every 50 ms and read over
the window between the first job's start and the last job's end, so start-up and shutdown count
for nobody, for our workers and the peers alike. Backends are the server's processes whose
title names the bench's database (autovacuum workers on it included). Round trips are counted
by a TCP proxy (RoundTrips) on a pass of their own, as the proxy's hops would slow the measured
pass.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg

SAMPLE_SECONDS = 0.05
ROWS_WRITTEN = """
    SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname = 'jobs'), 0),
           coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname LIKE 'job\\_history%%'), 0),
           coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del)
                    FILTER (WHERE relname <> 'jobs' AND relname NOT LIKE 'job\\_history%%'), 0)
    FROM pg_stat_user_tables"""


@dataclass
class _Series:
    """One process's CPU seconds (user + system) over time."""

    created: float
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def at(self, t: float) -> float:
        if t <= self.created or not self.times:
            return 0.0
        i = bisect.bisect_left(self.times, t)
        if i == 0:
            return self.cpu[0]
        if i == len(self.times):
            return self.cpu[-1]  # exited (or not sampled since): what it had used
        t0, t1, c0, c1 = self.times[i - 1], self.times[i], self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


class CostMeter:
    """Samples, in a thread, the CPU of the process trees given to watch() and of the server's
    backends on `url`'s database; cost() reads them over a window. WAL and rows written are
    read when the meter starts and stops (the workers have exited by then, so the server has
    their statistics)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._roots: list[int] = []
        self._workers: dict[int, _Series] = {}
        self._backends: dict[int, _Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="cost-meter", daemon=True)
        self._postmaster: psutil.Process | None = None
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT current_database(), pg_backend_pid()").fetchone()
            assert row is not None
            self._database, own = str(row[0]), int(row[1])
            self._title = f" {self._database} "
            # A server on another host or in a container: no backend CPU (its pids are not ours).
            with contextlib.suppress(psutil.Error):
                backend = psutil.Process(own)
                if self._title in " ".join(backend.cmdline()) + " ":
                    self._postmaster = backend.parent()
        self._start: tuple[int, int, int, int] | None = None
        self._end: tuple[int, int, int, int] | None = None

    def watch(self, pid: int) -> None:
        """A worker (or peer) process: it and every process it starts count as workers."""
        self._roots.append(pid)

    def __enter__(self) -> CostMeter:
        self._start = self._server_counters()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._end = self._server_counters()

    def _server_counters(self) -> tuple[int, int, int, int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            wal = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
            rows = conn.execute(ROWS_WRITTEN).fetchone()
        assert wal is not None and rows is not None
        return int(wal[0]), int(rows[0]), int(rows[1]), int(rows[2])

    def _processes(self) -> Iterator[tuple[dict[int, _Series], psutil.Process]]:
        for root in self._roots:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(root)
                for proc in (parent, *parent.children(recursive=True)):
                    yield self._workers, proc
        if self._postmaster is not None:
            with contextlib.suppress(psutil.Error):
                for proc in self._postmaster.children():
                    with contextlib.suppress(psutil.Error):
                        if proc.pid in self._backends or self._title in " ".join(proc.cmdline()) + " ":
                            yield self._backends, proc

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_SECONDS)
        self.sample()

    def sample(self) -> None:
        for series_of, proc in list(self._processes()):
            with contextlib.suppress(psutil.Error), proc.oneshot():
                cpu = proc.cpu_times()
                now = time.time()
                series = series_of.get(proc.pid)
                if series is None:
                    series = series_of[proc.pid] = _Series(created=proc.create_time())
                series.times.append(now)
                series.cpu.append(cpu.user + cpu.system)

    def cost(self, t0: float, t1: float, jobs: int) -> dict[str, Any]:
        """Per job, over [t0, t1] (wall clock, seconds since the epoch)."""
        assert self._start is not None and self._end is not None, "read the cost after the block"

        def cpu(series: dict[int, _Series]) -> float:
            return sum(s.at(t1) - s.at(t0) for s in series.values())

        per = max(jobs, 1)
        wal, jobs_rows, history_rows, other_rows = (
            b - a for a, b in zip(self._start, self._end, strict=True))
        return {
            "worker_cpu_us": round(cpu(self._workers) * 1e6 / per, 1),
            "pg_cpu_us": round(cpu(self._backends) * 1e6 / per, 1) if self._postmaster else None,
            "wal_bytes": round(wal / per),
            "rows_written": round((jobs_rows + history_rows + other_rows) / per, 2),
            "rows_written_by_table": {"jobs": round(jobs_rows / per, 2),
                                      "history": round(history_rows / per, 2),
                                      "other": round(other_rows / per, 2)},
        }


class RoundTrips:
    """A TCP proxy in front of the server counting round trips: each time a client sends after
    the server last spoke on that connection (a pipeline or a batch is one). Runs in a thread
    with a loop of its own; `url` is what clients connect to."""

    def __init__(self, server_url: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(server_url)
        host = str(params.get("host") or "/var/run/postgresql")
        port = int(params.get("port") or 5432)
        self._upstream: tuple[str, int] | str = (
            f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = psycopg.conninfo.make_conninfo(server_url, host="127.0.0.1", port=self.port)
        self.count = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="round-trips", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> RoundTrips:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # each pipe then ends, and its connection with it
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        if isinstance(self._upstream, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self._upstream)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        server_spoke = [True]
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            try:
                while data := await src.read(65536):
                    if from_client and server_spoke[0]:
                        self.count += 1
                    server_spoke[0] = not from_client
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
