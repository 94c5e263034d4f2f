"""The second review of shared limits and outbound requests, one test per finding (issue 19,
items 1, 4-7, 11-14), against a real PostgreSQL. Each says how it failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from pgdispatch.worker.engine import Engine
from pgdispatch.worker.executors import http_request
from pgdispatch.worker.executors.context import ExecutorContext, executor_context
from pgdispatch.worker.job import Job
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outbound.hosts import host_key
from pgdispatch.worker.outbound.limits import Limits, Permit, Wait
from pgdispatch.worker.outcome import Discard, Postpone, Retry
from tests.helpers import execute, scalar, served, wait_until
from tests.test_limits import Counter, send_many, start_pool, stop, worker_limits


def in_flight(db_url: str, key: str) -> int:
    return int(scalar(db_url, "SELECT coalesce(sum(slots), 0) FROM dispatch.limit_slots WHERE key = %s", (key,)))


@contextlib.asynccontextmanager
async def context(db_url: str) -> AsyncIterator[ExecutorContext]:
    async with executor_context(db_url, destinations=Destinations(allow_private=True),
                                max_connections=10) as ctx:
        await ctx.limits.reload()
        yield ctx


async def claim_one(db_url: str, queue: str = "requests", kind: str = "http.request") -> Job:
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=1, open=False, kwargs={"autocommit": True})
    await pool.open()
    try:
        jobs = await Engine(pool, database_url=db_url, worker_id="t", version=0,
                            lease_seconds=30).claim(queue, [kind], 1)
    finally:
        await pool.close()
    assert len(jobs) == 1
    return jobs[0]


def send(db_url: str, uri: str, **kwargs: Any) -> int:
    names = "".join(f", {k} => %({k})s" for k in kwargs)
    return int(scalar(db_url, f"SELECT dispatch.send_request('POST', %(uri)s{names})", {"uri": uri, **kwargs}))


# -- 1. a cancelled request gives its shared slot back ---------------------------------------------

async def test_a_request_cancelled_while_admitted_gives_back_the_slot_it_took(db_url: str) -> None:
    # Before: admit recorded the slot of tenant:t|host:h, then waited for host:h's; the job's
    # timeout cancelled it there, the first slot was never returned, and the slot heartbeat kept
    # its lease alive for as long as the process lived (every other worker locked out).
    execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES ('tenant:t|host:h.example', 1), "
                    "('host:h.example', 1)")
    async with worker_limits(db_url) as holder, worker_limits(db_url) as waiter:
        held = await holder.admit(None, "h.example")
        assert isinstance(held, Permit) and held.slots == ["host:h.example"]
        admitting = asyncio.create_task(waiter.admit("t", "h.example"))
        await wait_until(lambda: in_flight(db_url, "tenant:t|host:h.example") == 1, 5)
        admitting.cancel()  # the crm queue's 10 s job timeout, smart redirect's 2 s budget
        with contextlib.suppress(asyncio.CancelledError):
            await admitting
        await wait_until(lambda: in_flight(db_url, "tenant:t|host:h.example") == 0, 3)
        await holder.settle(held, failed=False)
        again = await holder.admit("t", "h.example")  # any worker can take it now
        assert isinstance(again, Permit) and again.slots == ["tenant:t|host:h.example", "host:h.example"]


async def test_a_slot_granted_to_a_caller_that_is_gone_is_dropped_by_the_next_heartbeat(db_url: str) -> None:
    # A grant the database made while its caller was cancelled, before it could be recorded
    # (planted here as the row such a grant leaves). Before: renew_slots_v1 renewed every row of
    # the holder, so its lease never ran out; now the heartbeat renews what the process holds.
    execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES ('host:g.example', 1)")
    async with worker_limits(db_url, slot_lease=1.5) as limits:
        execute(db_url, "INSERT INTO dispatch.limit_slots (key, holder, slots, expires_at) "
                        "VALUES ('host:g.example', %s, 1, now() + interval '1.5 s')", (limits.holder,))
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.limit_slots") == 0, 3)
        assert isinstance(await limits.admit(None, "g.example"), Permit)


async def test_a_request_cancelled_waiting_for_its_host_gives_back_its_shared_slot(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: http_request awaited host.acquire() after admit and before its try, so a job
    # timeout there kept the shared slot. The injected acquire blocks exactly there.
    execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES ('host:127.0.0.1:9', 3)")
    entered = asyncio.Event()

    async def blocked(self: Any) -> int:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(http_request._Host, "acquire", blocked)
    send(db_url, "http://127.0.0.1:9/x")
    job = await claim_one(db_url)
    async with context(db_url) as ctx:
        sending = asyncio.create_task(http_request.HttpRequestExecutor(ctx)(job))
        await asyncio.wait_for(entered.wait(), 5)
        assert in_flight(db_url, "host:127.0.0.1:9") == 1
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        await wait_until(lambda: in_flight(db_url, "host:127.0.0.1:9") == 0, 3)


# -- 4. the limits' own database never costs a job an attempt --------------------------------------

async def test_a_database_error_inside_admit_postpones_the_request_without_spending_an_attempt(
        db_url: str) -> None:
    # Before: the pool timeout escaped admit, the executor raised, and the job was retried with
    # an attempt spent, although limits "never fail a job".
    execute(db_url, "INSERT INTO dispatch.limits (key, rate) VALUES ('host:127.0.0.1:9', 5)")
    pool = AsyncConnectionPool(db_url, min_size=1, max_size=1, timeout=0.3, open=False,
                               kwargs={"autocommit": True})
    await pool.open()
    limits = Limits(pool)
    try:
        await limits.reload()
        async with pool.connection():  # its only connection is busy: the next ask times out
            wait = await limits.admit(None, "127.0.0.1:9")
        assert isinstance(wait, Wait)
        assert wait.reason.startswith("not sent: the shared limits could not be read (PoolTimeout)")
        send(db_url, "http://127.0.0.1:9/x")
        job = await claim_one(db_url)
        async with context(db_url) as ctx:
            executor = http_request.HttpRequestExecutor(ExecutorContext(
                http=ctx.http, keys=ctx.keys, limits=limits, destinations=ctx.destinations))
            async with pool.connection():
                outcome = await executor(job)
        assert isinstance(outcome, Postpone) and "shared limits could not be read" in outcome.reason
    finally:
        await pool.close()


# -- 5, 6. a rate that binds: one put-back per delivery, one bucket update per block ---------------

@pytest.mark.chaos
async def test_a_rate_limited_backlog_across_two_pools_is_put_back_at_most_once_per_delivery(
        db_url: str) -> None:
    # Before (3 pools of 2 processes, 1,000 requests at 50/s): 2,307-2,473 released rows and
    # 7,087-7,819 updates of the bucket row for 1,000 deliveries; jobs went back up to 8 times.
    counter = Counter()
    async with served(counter.handle) as counter.url:
        host = counter.url.removeprefix("http://")
        execute(db_url, "INSERT INTO dispatch.limits (key, rate) VALUES (%s, 50)", (f"host:{host}",))
        send_many(db_url, f"{counter.url}/x", 400)
        before = scalar(db_url, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'limit_state'")
        pools = [start_pool(db_url, "--processes", "2") for _ in range(2)]
        try:
            await wait_until(lambda: len(counter.arrivals) >= 400, 60)
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 10)
        finally:
            for pool in pools:
                stop(pool)
        arrivals = sorted(counter.arrivals)
        # The rate held at the server: by any moment no more than the burst (one second's worth)
        # plus the rate times the time since the first arrival, and a margin for scheduling.
        assert all(i + 1 <= 50 + 50 * (t - arrivals[0]) + 5 for i, t in enumerate(arrivals))
    released = scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'released'")
    delivered = scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'")
    assert delivered == 400
    assert released <= delivered, f"{released} put back for {delivered} delivered"
    # Counters reach the statistics within a second or so of each backend's last transaction.
    await asyncio.sleep(1.5)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SELECT pg_stat_force_next_flush()")
        updates = c.execute("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'limit_state'"
                            ).fetchone()[0] - before  # type: ignore[index]
    assert updates <= delivered / 2, f"{updates} updates of the bucket row for {delivered} requests"


async def test_a_process_that_waits_is_granted_a_block_ahead_of_time_not_one_token(db_url: str) -> None:
    # Before: an empty bucket answered "wait (1 - tokens) / rate", and then granted the single
    # token it held: one update per request, the processes fighting over each token.
    execute(db_url, "INSERT INTO dispatch.limits (key, rate, burst) VALUES ('host:b.example', 100, 10)")
    async with worker_limits(db_url) as limits:
        started = time.monotonic()
        permits = await asyncio.gather(*(limits.admit(None, "b.example") for _ in range(50)))
        took = time.monotonic() - started
    assert all(isinstance(p, Permit) for p in permits)
    assert 0.3 < took < 1.5  # 40 tokens at 100/s after the burst of 10
    # Blocks of 10 (a tenth of a second's rate), each one update: 5, where it was 41.
    assert limits.counters.token_blocks <= 8


# -- 7. parks read the key's own requests, one park at a time --------------------------------------

def test_waiting_requests_are_found_by_host_through_an_index(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    # Before: park_requests_v1 filtered on dispatch.request_host(args) with no index: a regex per
    # queued row, 2.7 s on 1M queued requests.
    conn.execute("INSERT INTO dispatch.jobs (queue, kind, args) SELECT 'requests', 'http.request', "
                 "jsonb_build_object('method', 'POST', 'uri', 'https://h' || (i % 100) || '.example/x') "
                 "FROM generate_series(1, 5000) i")
    conn.execute("ANALYZE dispatch.jobs")
    plan = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT id FROM dispatch.jobs WHERE dispatch.request_host_v2(args) = 'h7.example' "
        "AND kind = 'http.request' AND state <> 'running'").fetchone()[0]  # type: ignore[index]
    assert "jobs_request_host" in str(plan)


async def test_many_429s_at_once_pause_and_park_a_key_once(db_url: str) -> None:
    # Before: each 429 with Retry-After paused the key and parked its backlog itself: 100
    # in-flight 429s were 100 concurrent scans.
    send_many(db_url, "https://api.example.com/x", 30)
    async with worker_limits(db_url) as limits:
        permits = [await limits.admit(None, "api.example.com") for _ in range(20)]
        await asyncio.gather(*(limits.settle(p, failed=True, retry_after=30, reason="HTTP 429 (expected 200)")
                               for p in permits if isinstance(p, Permit)))
        await wait_until(lambda: limits.counters.parked == 30, 5)
    assert limits.counters.pauses == 1


# -- 11. a producer's tenant cannot spend another tenant's limits, nor a feature's -----------------

async def test_a_tenant_with_separators_cannot_take_another_tenants_slot(db_url: str) -> None:
    # Before: tenant `victim|host:api.v.example` made the key tenant:victim|host:api.v.example
    # among its own, and held the victim's only slot.
    execute(db_url, "INSERT INTO dispatch.limits (key, concurrency) VALUES "
                    "('tenant:victim|host:api.v.example', 1), ('tenant:enterprise:0367:retailcrm', 1)")
    async with worker_limits(db_url) as limits:
        attacker = await limits.admit("victim|host:api.v.example", "x.example")
        assert isinstance(attacker, Permit)
        assert attacker.slots == [] and limits.keys("victim|host:api.v.example", "x.example")[2] == \
            "tenant:victim%7Chost%3Aapi.v.example"
        victim = await limits.admit("victim", "api.v.example")
        assert isinstance(victim, Permit) and victim.slots == ["tenant:victim|host:api.v.example"]
        # A feature's own key (an enterprise's CRM) is out of a producer's reach...
        forged = await limits.admit("enterprise:0367:retailcrm", "acme.retailcrm.ru")
        assert isinstance(forged, Permit) and forged.slots == []
        crm = await limits.admit_scopes(["enterprise:0367:retailcrm"], "acme.retailcrm.ru")
        assert isinstance(crm, Permit) and crm.slots == ["tenant:enterprise:0367:retailcrm"]
        # ...and a tenant named like a pattern is a tenant, not the pattern.
        assert limits.keys("*", "h")[2] == "tenant:%2A"


# -- 12. a host is one host however it is written ---------------------------------------------------

@pytest.mark.parametrize(("uri", "key"), [
    ("http://API.Example.com.:81/x", "api.example.com:81"),
    ("http://api.example.com:81/x", "api.example.com:81"),
    ("https://x:pw@Api.Example.COM:443/x?y", "api.example.com"),
    ("https://api.example.com./", "api.example.com"),
    ("http://localhost.:8080/", "localhost:8080"),
    ("http://[::1]:8080/", "[::1]:8080"),
    ("http://[::1]:80/", "[::1]"),
    ("http://x@127.0.0.1#", "127.0.0.1"),
    ("http://h:080/", "h"),
])
def test_a_host_key_is_the_same_in_python_and_in_sql(conn: psycopg.Connection[tuple[Any, ...]], uri: str,
                                                      key: str) -> None:
    # Before: the key was the URL's netloc, so `API.Example.com.:81` was not `api.example.com:81`
    # and any host rule (rate, cap, breaker) was one dot away from bypassed.
    assert host_key(httpx.URL(uri)) == key
    assert http_request.HttpRequest.from_args({"method": "POST", "uri": uri}).host == key
    assert conn.execute("SELECT dispatch.request_host_v2(jsonb_build_object('uri', %s::text))",
                        (uri,)).fetchone() == (key,)


# -- 13. CR/LF in a header value is invalid, never a retry ------------------------------------------

def test_send_request_refuses_a_header_value_with_a_line_break(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    # Before: only header names were checked; every attempt then failed in the HTTP client and
    # was retried as transient, up to 1,440 attempts.
    for value in ("a\r\nX-Injected: 1", "a\nb"):
        with pytest.raises(psycopg.errors.CheckViolation, match="holds no CR, LF or NUL"):
            conn.execute("SELECT dispatch.send_request('POST', 'https://a.example/', headers => %s)",
                         (psycopg.types.json.Jsonb({"X-Trace": value}),))


def test_a_hand_inserted_header_with_a_line_break_is_invalid_at_the_worker() -> None:
    with pytest.raises(http_request.InvalidJob, match="holds no CR, LF or NUL"):
        http_request.HttpRequest.from_args({"method": "POST", "uri": "https://a.example/",
                                            "headers": {"X-Trace": "a\r\nX-Injected: 1"}})


# -- 14. an odd Retry-After is read defensively -------------------------------------------------------

@pytest.mark.parametrize(("value", "after"), [("²", 3.0), ("1e3", 3.0), ("9" * 5000, 86_400.0),
                                               ("Wed, 31 Dec 1969 23:59:59 GMT", 0.0), ("120", 120.0)])
async def test_an_odd_retry_after_falls_back_to_the_interval_and_caps_at_a_day(
        db_url: str, value: str, after: float) -> None:
    # Before: `²` passed str.isdigit and int() raised: the error stored was a bare ValueError,
    # the retry took the queue's backoff, not the request's interval, and nothing was paused.
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": value}, text="slow down")

    async with served(busy) as url:
        send(db_url, f"{url}/x", attempt_interval=3)
        job = await claim_one(db_url)
        async with context(db_url) as ctx:
            outcome = await http_request.HttpRequestExecutor(ctx)(job)
    assert isinstance(outcome, Retry) and outcome.error == "HTTP 429 (expected 200)"
    assert outcome.after == after
    if after:
        assert outcome.detail is not None and outcome.detail["retry_after"] == after


async def test_limits_never_let_a_forbidden_destination_through_as_discard(db_url: str) -> None:
    # The host key feeds the destination policy too: a rooted name is checked as the name.
    send(db_url, "http://127.0.0.1.:9/x")
    job = await claim_one(db_url)
    async with executor_context(db_url, destinations=Destinations(allow_private=False),
                                max_connections=10) as ctx:
        outcome = await http_request.HttpRequestExecutor(ctx)(job)
    assert isinstance(outcome, Discard) and outcome.reason == "invalid"
