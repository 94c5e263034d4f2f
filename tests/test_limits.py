"""Limits shared by every worker process and host (dispatch.limits; worker/outbound/limits.py).

Sharing is the point, so most tests run two Limits instances with pools, holders and LISTEN
connections of their own (two worker processes, as far as the database can tell), or two real
worker processes against a local HTTP server that counts what reaches it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from pgdispatch.notify import CONFIG_CHANNEL
from pgdispatch.notify.listener import Listener
from pgdispatch.worker.outbound.limits import Limits, Permit, Wait
from tests.helpers import execute, scalar, served, wait_until

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def worker_limits(db_url: str, **kwargs: Any) -> AsyncIterator[Limits]:
    """One worker's Limits, kept fresh by a LISTEN connection of its own, as in a worker."""
    async with Limits.open(db_url, **kwargs) as limits:
        listener = Listener(db_url, [CONFIG_CHANNEL], on_notify=lambda _, p: limits.on_notify(p),
                            on_reconnect=limits.reload)
        task = asyncio.create_task(listener.run())
        await asyncio.wait_for(listener.connected.wait(), 10)
        try:
            yield limits
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Counter:
    """A local HTTP server that records when each request arrived and how many overlapped."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.status = 200
        self.delay = 0.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text="ok")
        finally:
            self.in_flight -= 1


@pytest.fixture
async def counter() -> AsyncIterator[Counter]:
    state = Counter()
    async with served(state.handle) as state.url:
        yield state


def start_pool(db_url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--queue", "requests",
                             "--allow-private-networks", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(pool: subprocess.Popen[str]) -> str:
    pool.send_signal(signal.SIGTERM)
    out, _ = pool.communicate(timeout=60)
    assert pool.returncode == 0, out
    return out


def send_many(db_url: str, uri: str, n: int, **kwargs: Any) -> None:
    names = "".join(f", {k} => %({k})s" for k in kwargs)
    execute(db_url, f"SELECT dispatch.send_request('POST', %(uri)s{names}) FROM generate_series(1, %(n)s)",
            {"uri": uri, "n": n, **kwargs})


# -- rules ------------------------------------------------------------------------------------------

async def test_rules_apply_by_name_then_by_the_most_specific_pattern(db_url: str) -> None:
    execute(db_url, """INSERT INTO dispatch.limits (key, rate, concurrency) VALUES
                       ('host:*', NULL, 64), ('host:api.example.com', 7, NULL),
                       ('tenant:*|host:*', NULL, 5), ('tenant:acme|host:*', NULL, 2)""")
    async with worker_limits(db_url) as limits:
        assert limits.rule_for("host:api.example.com").rate == 7  # type: ignore[union-attr]
        assert limits.rule_for("host:other.example").concurrency == 64  # type: ignore[union-attr]
        assert limits.rule_for("tenant:acme|host:x.example").concurrency == 2  # type: ignore[union-attr]
        assert limits.rule_for("tenant:globex|host:x.example").concurrency == 5  # type: ignore[union-attr]
        assert limits.rule_for("tenant:globex") is None
        assert limits.keys("acme", "x.example:8443") == [
            "tenant:acme|host:x.example:8443", "host:x.example:8443", "tenant:acme"]


async def test_a_rule_changed_with_sql_reaches_running_workers(db_url: str) -> None:
    async with worker_limits(db_url) as a, worker_limits(db_url) as b:
        assert isinstance(await a.admit(None, "api.example.com"), Permit)
        execute(db_url, "INSERT INTO dispatch.limits (key, rate, burst) VALUES ('host:api.example.com', 0.2, 1)")
        await wait_until(lambda: a.rule_for("host:api.example.com") and b.rule_for("host:api.example.com"))
        first = await a.admit(None, "api.example.com")
        second = await b.admit(None, "api.example.com")  # the bucket is shared: one token per 5 s
        assert isinstance(first, Permit)
        assert isinstance(second, Wait) and "at its rate of 0.2/s" in second.reason and second.seconds > 4
        execute(db_url, "DELETE FROM dispatch.limits")
        await wait_until(lambda: b.rule_for("host:api.example.com") is None)
        assert isinstance(await b.admit(None, "api.example.com"), Permit)


# -- breakers and pauses ----------------------------------------------------------------------------

async def test_a_breaker_opened_by_one_worker_stops_the_other_and_one_probe_decides(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    send_many(db_url, "https://crm.example/hook", 50, tenant="acme")
    async with worker_limits(db_url, breaker_failures=3, breaker_cooldown=1.0) as a, \
            worker_limits(db_url, breaker_failures=3, breaker_cooldown=1.0) as b:
        for _ in range(3):
            permit = await a.admit("acme", "crm.example")
            assert isinstance(permit, Permit)
            await a.settle(permit, failed=True, reason="HTTP 503 (expected 200)")
        # The other worker learns it from the notification, not from failures of its own.
        await wait_until(lambda: "tenant:acme|host:crm.example" in b.stats()["blocked"], 1.0)
        refused = await b.admit("acme", "crm.example")
        assert isinstance(refused, Wait)
        assert refused.reason == ("not sent: tenant:acme|host:crm.example circuit open after 3 consecutive "
                                  "failures (HTTP 503 (expected 200))")
        assert isinstance(await b.admit("globex", "crm.example"), Permit)  # other tenants go on
        # Its waiting requests left the claim's way: one comes back at the end of the cooldown
        # to carry the probe, the others a cooldown later (or when the probe succeeds).
        # The worker that opened the breaker parks them in the background: wait for all 50.
        def parked() -> Any:
            with psycopg.connect(db_url) as conn:
                return conn.execute(
                    "WITH p AS (SELECT run_at FROM dispatch.jobs "
                    "           WHERE state = 'scheduled' AND last_error LIKE 'not sent: circuit%') "
                    "SELECT count(*) FILTER (WHERE run_at < (SELECT min(run_at) FROM p) + interval '0.5 s'), "
                    "       count(*) FROM p").fetchone()
        await wait_until(lambda: parked()[1] == 50, 5.0)
        assert parked() == (1, 50)
        await asyncio.sleep(1.1)  # the cooldown itself is what this test is about
        outcomes = await asyncio.gather(*(w.admit("acme", "crm.example") for w in (a, b, a, b)))
        probes = [o for o in outcomes if isinstance(o, Permit)]
        assert len(probes) == 1 and probes[0].probe == "tenant:acme|host:crm.example"
        await (a if probes[0] in outcomes[::2] else b).settle(probes[0], failed=False)
        await wait_until(lambda: not a.stats()["blocked"] and not b.stats()["blocked"], 1.0)
        assert isinstance(await b.admit("acme", "crm.example"), Permit)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE state = 'available'") == 50
    assert any("closed: the probe succeeded (50 waiting requests back)" in r.getMessage() for r in caplog.records)


async def test_a_failed_probe_reopens_and_a_dead_probers_turn_passes_on(db_url: str) -> None:
    async with worker_limits(db_url, breaker_failures=1, breaker_cooldown=0.3) as a, \
            worker_limits(db_url, breaker_failures=1, breaker_cooldown=0.3) as b:
        permit = await a.admit(None, "api.example.com")
        await a.settle(permit, failed=True, reason="timed out")  # type: ignore[arg-type]
        await wait_until(lambda: b.stats()["blocked"], 1.0)
        await asyncio.sleep(0.35)
        probe = await a.admit(None, "api.example.com")
        assert isinstance(probe, Permit) and probe.probe == "host:api.example.com"
        await a.settle(probe, failed=True, reason="timed out again")
        assert scalar(db_url, "SELECT open_reason FROM dispatch.limit_state") == \
            "after its probe failed (timed out again)"
        await asyncio.sleep(0.35)
        probe = await b.admit(None, "api.example.com")
        assert isinstance(probe, Permit) and probe.probe
        b.cancel(probe)  # shutdown before sending: the probe is handed back at once
        await wait_until(lambda: scalar(db_url, "SELECT probe_holder FROM dispatch.limit_state") is None, 2)
        assert isinstance(await a.admit(None, "api.example.com"), Permit)


async def test_retry_after_pauses_the_key_for_every_worker_without_spending_attempts(db_url: str) -> None:
    send_many(db_url, "https://api.example.com/x", 20)
    async with worker_limits(db_url) as a, worker_limits(db_url) as b:
        permit = await a.admit(None, "api.example.com")
        assert isinstance(permit, Permit)
        await a.settle(permit, failed=True, retry_after=3, reason="HTTP 429 (expected 200)")
        await wait_until(lambda: "host:api.example.com" in b.stats()["blocked"], 1.0)
        wait = await b.admit(None, "api.example.com")
        assert isinstance(wait, Wait) and 2 <= wait.seconds <= 5
        assert wait.reason == "not sent: host:api.example.com HTTP 429 (expected 200)"
    row = psycopg.connect(db_url).execute(
        "SELECT count(*), min(extract(epoch FROM run_at - now())), max(attempt) FROM dispatch.jobs "
        "WHERE state = 'scheduled'").fetchone()
    assert row[0] == 20 and 2 < row[1] <= 3 and row[2] == 0
    status = psycopg.connect(db_url).execute(
        "SELECT key, breaker, paused_until IS NOT NULL, why FROM dispatch.limit_status").fetchone()
    assert status == ("host:api.example.com", "closed", True, "HTTP 429 (expected 200)")


# -- rates and caps across real worker processes ------------------------------------------------------

@pytest.mark.chaos
async def test_a_rate_limit_and_a_cap_hold_across_two_worker_processes(db_url: str, counter: Counter) -> None:
    host = counter.url.removeprefix("http://")
    execute(db_url, "INSERT INTO dispatch.limits (key, rate, burst, concurrency) VALUES (%s, 40, 10, 3)",
            (f"host:{host}",))
    counter.delay = 0.02
    send_many(db_url, f"{counter.url}/x", 200)
    pool = start_pool(db_url, "--processes", "2")
    try:
        await wait_until(lambda: len(counter.arrivals) == 200, 60)
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 10)
    finally:
        stop(pool)
    # The bucket's promise, counted at the server: by any moment, no more than the burst plus
    # the rate times the time since the first arrival (and a quarter second for the first token
    # block on its way); never more than 3 in flight, though two processes with 200 slots each
    # were sending.
    arrivals = sorted(counter.arrivals)
    over = [(i + 1, t - arrivals[0]) for i, t in enumerate(arrivals) if i + 1 > 10 + 40 * (t - arrivals[0] + 0.25)]
    assert over == []
    assert counter.most_in_flight <= 3
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'") == 200
    # No claim → release churn: what the first claims took beyond what the rate could serve
    # went back once, scheduled for its turn; no job went round and round.
    assert scalar(db_url, "SELECT max(n) FROM (SELECT count(*) AS n FROM dispatch.job_history "
                          "WHERE outcome = 'released' GROUP BY job_id) r") <= 2


@pytest.mark.chaos
async def test_slots_of_a_killed_worker_come_back_when_their_lease_runs_out(db_url: str, counter: Counter) -> None:
    host = counter.url.removeprefix("http://")
    execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES (%s, 2)", (f"host:{host}",))
    counter.delay = 30  # the requests hang while we kill their worker
    send_many(db_url, f"{counter.url}/x", 2, http_timeout=60)
    pool = start_pool(db_url, "--lease", "5s")
    try:
        await wait_until(lambda: scalar(db_url, "SELECT coalesce(sum(slots), 0) FROM dispatch.limit_slots") == 2, 30)
        child = scalar(db_url, "SELECT pid FROM dispatch.workers WHERE stopped_at IS NULL")
        os.kill(pool.pid, signal.SIGKILL)  # the pool, then its worker, both without a word
        os.kill(child, signal.SIGKILL)
        pool.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            pool.kill()
    async with worker_limits(db_url) as limits:
        assert scalar(db_url, "SELECT in_flight FROM dispatch.limit_status") == 2
        refused = await limits.admit(None, host)  # the dead worker's slots still count...
        assert isinstance(refused, Wait) and "has 2 requests in flight across all workers" in refused.reason
        await wait_until(lambda: scalar(db_url, "SELECT in_flight FROM dispatch.limit_status") == 0, 10)
        assert isinstance(await limits.admit(None, host), Permit)  # ...until their lease ran out


def test_limits_cli(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pgdispatch.console import main as cli

    os.environ["DATABASE_URL"] = db_url
    try:
        assert cli.main(["limits", "set", "host:*", "--concurrency", "64"]) == 0
        assert cli.main(["limits", "set", "tenant:acme|host:api.example.com", "--rate", "10",
                         "--breaker-cooldown", "1m", "--note", "RetailCRM: 10/s per key"]) == 0
        assert cli.main(["limits", "set", "tenant:acme|host:api.example.com", "--burst", "20"]) == 0
        assert cli.main(["limits", "set", "host:*", "--concurrency", "off", "--rate", "5"]) == 0
        row = psycopg.connect(db_url).execute(
            "SELECT rate, burst, breaker_cooldown::text, note FROM dispatch.limits WHERE key LIKE 'tenant:%'").fetchone()
        assert row == (10, 20, "00:01:00", "RetailCRM: 10/s per key")
        assert scalar(db_url, "SELECT concurrency IS NULL AND rate = 5 FROM dispatch.limits WHERE key = 'host:*'")
        assert cli.main(["limits", "list", "--json"]) == 0
        assert '"key": "host:*"' in capsys.readouterr().out
        assert cli.main(["limits", "set", "api.example.com", "--rate", "1"]) == 2
        assert "limit_key_format" in capsys.readouterr().err
        with pytest.raises(SystemExit) as usage:
            cli.main(["limits", "set", "host:x", "--rate", "fast"])
        assert usage.value.code == 2
        assert cli.main(["limits", "set", "host:x"]) == 2
        assert cli.main(["limits", "clear", "host:nope"]) == 3
        assert cli.main(["limits", "clear", "host:*"]) == 0
        execute(db_url, "SELECT dispatch.pause_limit_v1('host:api.example.com', now() + interval '1 h', 'HTTP 429')")
        assert cli.main(["limits", "reset", "host:api.example.com"]) == 0
        assert scalar(db_url, "SELECT paused_until FROM dispatch.limit_state") is None
        assert cli.main(["worker", "--allow-destination", "http://nope/"]) == 2
        assert "neither a network" in capsys.readouterr().err
    finally:
        del os.environ["DATABASE_URL"]
