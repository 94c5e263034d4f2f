"""Our own database going away (issue 19, items 15 and 17), against a real PostgreSQL: every
connection of a worker is cut, as a server restart cuts them. Each test says how it failed."""

from __future__ import annotations

import psycopg

import pgdispatch
from pgdispatch.db.connections import DIRECT, guarded, open_pool
from pgdispatch.worker.attempt import run_attempt
from pgdispatch.worker.executors.context import executor_context
from pgdispatch.worker.executors.lead_delivery import LeadDeliveryExecutor
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outcome import Postpone
from tests.helpers import execute, running_worker, scalar, wait_until
from tests.test_limits_review import claim_one

app = pgdispatch.App()
ran: list[int] = []


@app.executor("t.reads", max_attempts=1)
async def reads(job: pgdispatch.Job) -> None:
    async with job.connection() as conn:
        await conn.execute("SELECT 1")
    ran.append(job.id)


def cut_every_connection(db_url: str) -> int:
    """What a server restart does to a worker: every other connection to the database is gone."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


async def test_a_job_whose_connection_died_with_the_server_is_not_charged_an_attempt(db_url: str) -> None:
    # Before: the pools handed out the connections the restart had killed, with no check: each
    # failed one attempt ("server closed the connection unexpectedly"), and a job with little
    # budget (the crm queue's 3, a command's 1) went dead although it never reached its remote.
    pool = open_pool(db_url, settings=DIRECT, name="app", min_size=2, max_size=2, autocommit=False)
    await pool.open(wait=True)
    ran.clear()
    try:
        async with running_worker(db_url, app.executors(guarded(pool))):
            execute(db_url, "SELECT dispatch.enqueue('t.reads', '{}')")
            await wait_until(lambda: len(ran) == 1)
            assert cut_every_connection(db_url) >= 3  # the app's pool, the engine's, the listener
            execute(db_url, "SELECT dispatch.enqueue('t.reads', '{}')")
            await wait_until(lambda: len(ran) == 2, 15)
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
    finally:
        await pool.close()
    assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs") == 0
    assert scalar(db_url, "SELECT max(attempt) FROM dispatch.job_history WHERE outcome = 'completed'") == 1
    released = scalar(db_url, "SELECT string_agg(error, ' | ') FROM dispatch.job_history WHERE outcome = 'released'")
    assert released is None or "not run: database unavailable" in released


async def test_an_executor_read_that_loses_the_database_postpones_its_job(db_url: str) -> None:
    # The executors' own reads (a lead and its credential) go through the guarded pool too.
    execute(db_url, "INSERT INTO dispatch.leads (id) VALUES (1)")
    async with executor_context(db_url, destinations=Destinations(allow_private=True), max_connections=4) as ctx:
        assert ctx.database is not None
        async with ctx.database() as conn:
            await conn.execute("SELECT 1")  # a pooled connection, now idle
        cut_every_connection(db_url)
        execute(db_url, "INSERT INTO dispatch.jobs (queue, kind, args) VALUES ('leads', 'lead.deliver', "
                        "'{\"delivery_id\": 1}')")
        job = await claim_one(db_url, "leads", "lead.deliver")
        outcome = await run_attempt(LeadDeliveryExecutor(ctx), job, None)
    assert isinstance(outcome, Postpone) and outcome.reason.startswith("not run: database unavailable")


async def test_a_rescued_request_waits_its_own_interval_not_its_queues_backoff(db_url: str) -> None:
    # Before: a request whose worker died was rescued with the queue's backoff (60 s for
    # `requests`), not its attempt_interval (3 s here), although the README says the interval
    # applies.
    execute(db_url, "SELECT dispatch.send_request('POST', 'https://a.example/x', attempt_interval => 3)")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT dispatch.claim_jobs_v2('dead-worker', 'requests', '{http.request}', 0, 1, '1 s')")
        conn.execute("UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 s'")
        assert conn.execute("SELECT dispatch.rescue_expired_v3()").fetchone() == (1,)
        wait = conn.execute("SELECT extract(epoch FROM run_at - now()) FROM dispatch.jobs").fetchone()[0]  # type: ignore[index]
        assert 2 < wait <= 3
        # Workers of the previous release rescue the same way (v2 is v3 now).
        conn.execute("UPDATE dispatch.jobs SET state = 'running', lease_token = gen_random_uuid(), "
                     "lease_expires_at = now() - interval '1 s', attempt = attempt + 1")
        assert conn.execute("SELECT dispatch.rescue_expired_v2()").fetchone() == (1,)
        wait = conn.execute("SELECT extract(epoch FROM run_at - now()) FROM dispatch.jobs").fetchone()[0]  # type: ignore[index]
        assert 2 < wait <= 3

