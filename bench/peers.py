"""The peers, run the way their own documentation sets them up, for the side-by-side benchmark.

Each peer runs in its own process, like our worker does, started by bench/scenarios.py:

    python -m bench.peers PEER fill     --url URL --jobs N [--target URL]
    python -m bench.peers PEER drain    --url URL --scenario drain|deliver [--target URL]
    python -m bench.peers PEER serve    --url URL --scenario latency   # until SIGTERM
    python -m bench.peers PEER produce  --url URL --rate R --seconds S

Every command prints one JSON object on stdout. Jobs are no-ops, or with --target an HTTP POST
through the very HTTP transport our workers use (worker/outbound/transport.py) to the
same sink. Latency
payloads carry the producer's wall clock just before its insert; `serve` reports start and
done times against it. Nothing here is tuned down: batch sizes and concurrency are the peers'
best settings found by a sweep on this machine kind (see README "Performance").
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgdispatch.worker.outbound.transport import HttpTransport

PEERS = ("pgqueuer-psycopg", "pgqueuer-asyncpg", "procrastinate")
# Each peer's best setting per scenario, from sweeps on this machine kind (README "Performance"):
# pgqueuer batch sizes 10, 50, 100, 200, 500, 1000; procrastinate concurrency 10, 100, 500.
BEST = {
    ("pgqueuer-psycopg", "drain"): 1000, ("pgqueuer-asyncpg", "drain"): 1000,
    ("pgqueuer-psycopg", "deliver"): 1000, ("pgqueuer-asyncpg", "deliver"): 50,
    ("pgqueuer-psycopg", "latency"): 10, ("pgqueuer-asyncpg", "latency"): 10,
    ("procrastinate", "drain"): 100, ("procrastinate", "deliver"): 100, ("procrastinate", "latency"): 10,
}
HTTP_CONCURRENCY = 200  # the same connection limit our deliver scenario gives our worker
ENTRYPOINT = "bench"
PAYLOAD = b'{"request":"payload"}'


class Work:
    """What a job does: nothing, or one POST through the shared client; and the clock."""

    def __init__(self, target: str | None) -> None:
        self.target = target
        self.http: HttpTransport | None = None
        self.done = 0
        self.failed = 0
        self.latencies: list[tuple[float, float]] = []  # (start - insert, done - insert), seconds
        self.first_started = 0.0
        self.last_done = 0.0

    async def __aenter__(self) -> Work:
        if self.target:
            from pgdispatch.worker.outbound.transport import HttpTransport

            self.http = HttpTransport(max_connections=HTTP_CONCURRENCY)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            await self.http.__aexit__()

    async def run(self, payload: bytes | None) -> None:
        started = time.time()
        self.first_started = self.first_started or started
        if self.http is not None:
            async with self.http.exchange("POST", self.target or "", content=PAYLOAD) as response:
                await response.aread()
            if response.status_code != 202:
                self.failed += 1
        self.done += 1
        self.last_done = time.time()
        if payload and payload.startswith(b"t="):
            inserted = float(payload[2:])
            self.latencies.append((started - inserted, time.time() - inserted))


class Peer(abc.ABC):
    name: str

    @abc.abstractmethod
    async def install(self, url: str) -> None: ...

    @abc.abstractmethod
    async def enqueue(self, url: str, payloads: list[bytes]) -> None: ...

    @abc.abstractmethod
    async def producer(self, url: str) -> Callable[[bytes], Awaitable[None]]:
        """Connect, and return a single-row insert through the peer's own API (the connection
        lives as long as the producer process)."""

    @abc.abstractmethod
    async def work(self, url: str, work: Work, *, drain: bool, stop: asyncio.Event, setting: int) -> None:
        """Run the peer's worker; `setting` is its batch size or concurrency (see BEST)."""


class PgQueuer(Peer):
    def __init__(self, driver: str) -> None:
        self.driver = driver
        self.name = f"pgqueuer-{driver}"

    async def _queries_for(self, url: str) -> tuple[Any, Callable[[], Awaitable[None]]]:
        from pgqueuer import Queries

        if self.driver == "asyncpg":
            import asyncpg
            from psycopg.conninfo import conninfo_to_dict

            params = conninfo_to_dict(url)  # asyncpg takes no libpq key=value strings
            connection = await asyncpg.connect(
                host=params.get("host"), port=params.get("port"), user=params.get("user"),
                password=params.get("password"), database=params.get("dbname"))
            return Queries.from_asyncpg_connection(connection), connection.close
        import psycopg

        pconnection = await psycopg.AsyncConnection.connect(url, autocommit=True)
        return Queries.from_psycopg_connection(pconnection), pconnection.close

    async def install(self, url: str) -> None:
        queries, close = await self._queries_for(url)
        await queries.install()
        await close()

    async def enqueue(self, url: str, payloads: list[bytes]) -> None:
        queries, close = await self._queries_for(url)
        for i in range(0, len(payloads), 1000):
            chunk = payloads[i:i + 1000]
            await queries.enqueue([ENTRYPOINT] * len(chunk), list(chunk), [0] * len(chunk))
        await close()

    async def producer(self, url: str) -> Callable[[bytes], Awaitable[None]]:
        queries, _ = await self._queries_for(url)

        async def insert(payload: bytes) -> None:
            await queries.enqueue(ENTRYPOINT, payload)
        return insert

    async def work(self, url: str, work: Work, *, drain: bool, stop: asyncio.Event, setting: int) -> None:
        from pgqueuer import Job, QueueManager
        from pgqueuer.domain.types import QueueExecutionMode

        queries, close = await self._queries_for(url)
        manager = QueueManager(queries)

        @manager.entrypoint(ENTRYPOINT)  # type: ignore[untyped-decorator,unused-ignore]  # typed only when installed
        async def bench(job: Job) -> None:
            await work.run(job.payload)

        async def stop_on_signal() -> None:
            await stop.wait()
            manager.shutdown.set()

        stopper = asyncio.create_task(stop_on_signal())
        await manager.run(batch_size=setting, dequeue_timeout=timedelta(seconds=1),
                          mode=QueueExecutionMode.drain if drain else QueueExecutionMode.continuous)
        stopper.cancel()
        await close()


class Procrastinate(Peer):
    name = "procrastinate"

    def _app(self, url: str) -> Any:
        import procrastinate

        return procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    async def install(self, url: str) -> None:
        app = self._app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    async def enqueue(self, url: str, payloads: list[bytes]) -> None:
        app = self._app(url)
        task = self._task(app, None)
        async with app.open_async():
            for i in range(0, len(payloads), 1000):
                await task.batch_defer_async(*({"payload": p.decode()} for p in payloads[i:i + 1000]))

    async def producer(self, url: str) -> Callable[[bytes], Awaitable[None]]:
        app = self._app(url)
        task = self._task(app, None)
        await app.open_async()

        async def insert(payload: bytes) -> None:
            await task.defer_async(payload=payload.decode())
        return insert

    @staticmethod
    def _task(app: Any, work: Work | None) -> Any:
        @app.task(name=ENTRYPOINT)  # type: ignore[untyped-decorator,unused-ignore]
        async def bench(payload: str) -> None:
            if work is not None:
                await work.run(payload.encode())
        return bench

    async def work(self, url: str, work: Work, *, drain: bool, stop: asyncio.Event, setting: int) -> None:
        app = self._app(url)
        self._task(app, work)
        async with app.open_async():
            worker = asyncio.create_task(app.run_worker_async(
                concurrency=setting, wait=not drain, install_signal_handlers=False,
                fetch_job_polling_interval=1.0))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([worker, stopper], return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                worker.cancel()  # procrastinate's documented graceful stop from inside a program
                await asyncio.gather(worker, return_exceptions=True)
            stopper.cancel()


def peer(name: str) -> Peer:
    if name.startswith("pgqueuer-"):
        return PgQueuer(name.removeprefix("pgqueuer-"))
    if name == "procrastinate":
        return Procrastinate()
    raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    chosen = peer(args.peer)
    if args.command == "fill":
        await chosen.install(args.url)
        await chosen.enqueue(args.url, [b"x"] * args.jobs)
        return {"queued": args.jobs}
    if args.command == "install":
        await chosen.install(args.url)
        return {}
    if args.command == "produce":
        insert = await chosen.producer(args.url)
        start = time.perf_counter()
        count = int(args.rate * args.seconds)
        for i in range(count):
            await insert(f"t={time.time()!r}".encode())
            await asyncio.sleep(max(0.0, start + (i + 1) / args.rate - time.perf_counter()))
        return {"inserted": count}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Work(args.target) as work:
        print("ready", flush=True)
        await chosen.work(args.url, work, drain=args.command == "drain", stop=stop,
                          setting=BEST[args.peer, args.scenario])
    return {"first_started": work.first_started, "last_done": work.last_done, "done": work.done,
            "failed": work.failed, "latencies": work.latencies}


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("command", choices=["install", "fill", "drain", "serve", "produce"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--target")
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--scenario", choices=["drain", "deliver", "latency"], default="drain",
                        help="which of BEST's settings to run with")
    args = parser.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(main(args))), flush=True)


if __name__ == "__main__":
    cli()
