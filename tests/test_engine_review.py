"""The engine review's findings, one test each, against a real PostgreSQL.

Each test is written so it fails on the code before its fix (the comment says how)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgdispatch import sql
from pgdispatch.notify.cache import KeyedCache
from pgdispatch.notify.listener import Listener
from pgdispatch.worker.engine import Engine
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import DONE, Outcome
from tests.helpers import execute, running_worker, scalar, wait_until
from tests.test_sql_api import claim, finish

ROOT = Path(__file__).resolve().parent.parent
Conn = psycopg.Connection[tuple[Any, ...]]


@contextlib.contextmanager
def login(db_url: str, role: str) -> Iterator[Conn]:
    """A connection as a fresh login role granted dispatch_<role>; the role is dropped after."""
    name = f"pgd_{role}_{uuid.uuid4().hex[:8]}"
    execute(db_url, f"CREATE ROLE {name} LOGIN PASSWORD 'pw' IN ROLE dispatch_{role}")
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(db_url, user=name, password="pw"),
                             autocommit=True) as c:
            yield c
    finally:
        execute(db_url, f"DROP ROLE IF EXISTS {name}")


def _dead(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT job_id, kind, reason FROM dispatch.dead_jobs ORDER BY job_id").fetchall()


# -- 1. history maintenance never blocks the outcome path -----------------------------------------

async def test_history_maintenance_never_queues_outcomes_behind_a_long_reader(db_url: str) -> None:
    # Before: prune_history DROPped the old partition under ACCESS EXCLUSIVE with no lock_timeout;
    # it queued behind the reader, and the finish below queued behind it until statement_timeout.
    execute(db_url, "SELECT dispatch.create_history_partition('2000-01-01')")
    execute(db_url, "INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, outcome, finished_at) "
                    "VALUES (1, 1, 'default', 'k', 'completed', '2000-01-01 12:00')")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    pool = AsyncConnectionPool(db_url, open=False, kwargs={"autocommit": True})
    await pool.open()
    engine = Engine(pool, database_url=db_url, worker_id="w", version=0, lease_seconds=30)
    try:
        with psycopg.connect(db_url) as reader:  # a pg_dump, a long psql query on request_attempts
            reader.execute("SELECT count(*) FROM dispatch.job_history")
            maintenance = asyncio.create_task(engine.maintain(history_keep_seconds=14 * 86400,
                                                              dead_keep_seconds=30 * 86400))
            await wait_until(lambda: maintenance.done() or scalar(
                db_url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock'"), timeout=10, every=0.005)
            async with await psycopg.AsyncConnection.connect(
                    db_url, autocommit=True, options="-c statement_timeout=3000") as writer:
                cur = await writer.execute(
                    "SELECT id, lease_token FROM dispatch.claim_jobs_v2('w', 'default', '{k}', 0, 1, '30 s')")
                job_id, token = (await cur.fetchall())[0]
                cur = await writer.execute(
                    "SELECT dispatch.finish_jobs_v2(%s, %s, '{completed}', '{0}', '{NULL}', '{NULL}', "
                    "'{NULL}', '{NULL}')", ([job_id], [token]))
                assert await cur.fetchone() == (1,)
            assert await maintenance == 0  # it gave up on the partition in use, without failing
        # The next run, with nobody reading, finishes the detach and drops the partition.
        assert await engine.maintain(history_keep_seconds=14 * 86400, dead_keep_seconds=30 * 86400) == 1
        assert scalar(db_url, "SELECT to_regclass('dispatch.job_history_20000101')") is None
    finally:
        await pool.close()


def test_only_one_worker_at_a_time_creates_partitions(conn: Conn, db_url: str) -> None:
    conn.execute("SELECT pg_advisory_lock(hashtext('pgdispatch.history_partitions'))")
    with psycopg.connect(db_url, autocommit=True) as other:
        # Another worker holds the maintenance lock: this one returns at once instead of waiting.
        assert other.execute("SELECT dispatch.ensure_history_partitions(30)").fetchone() == (0,)
    conn.execute("SELECT pg_advisory_unlock(hashtext('pgdispatch.history_partitions'))")
    assert conn.execute("SELECT dispatch.ensure_history_partitions(30)").fetchone()[0] > 0  # type: ignore[index]


async def test_a_missing_history_partition_is_created_by_the_outcome_writer(db_url: str) -> None:
    # Workers create partitions a week ahead; a clock jump or a long outage may still outrun
    # them: the outcome writer creates them and writes again instead of leaving jobs leased.
    today = scalar(db_url, "SELECT 'job_history_' || to_char(current_date, 'YYYYMMDD')")
    execute(db_url, f"DROP TABLE dispatch.{today}")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.ok')")

    async def ok(job: Job) -> Outcome:
        return DONE

    async with running_worker(db_url, {"t.ok": ok}):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed'"))
    assert scalar(db_url, f"SELECT to_regclass('dispatch.{today}') IS NOT NULL")


# -- 2. producers write only what the SQL API documents ------------------------------------------

@pytest.mark.parametrize(("column", "value"), [
    ("id", "999999"), ("state", "'running'"), ("lease_token", "gen_random_uuid()"),
    ("lease_expires_at", "now() + interval '1 day'"), ("version", "9223372036854775807"),
    ("attempt", "5"), ("created_at", "now()"), ("leased_by", "'x'"), ("last_error", "'x'"),
])
def test_producers_cannot_write_the_engines_columns(db_url: str, column: str, value: str) -> None:
    with login(db_url, "producer") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"INSERT INTO dispatch.jobs (kind, {column}) VALUES ('k', {value})")
        row = c.execute("""INSERT INTO dispatch.jobs (queue, kind, args, priority, run_at, expire_at,
                               max_attempts, idempotency_key, tenant)
                           VALUES ('default', 'k', '{}', 1, now(), now() + interval '1 h', 3, 'key', 't')
                           RETURNING id""").fetchone()
        assert row is not None
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1


# -- 3. retry_dead keeps what the job had --------------------------------------------------------

def test_retry_dead_keeps_expiry_key_and_creation_time(conn: Conn) -> None:
    conn.execute("""SELECT dispatch.enqueue('k', idempotency_key => 'order-1',
                                            expire_at => now() + interval '1 hour')""")
    before = conn.execute("SELECT id, expire_at, created_at FROM dispatch.jobs").fetchone()
    assert before is not None
    (job_id, token, _, _), = claim(conn)
    finish(conn, [(job_id, token, "dead")], reason="discarded")
    assert conn.execute("SELECT dispatch.retry_dead(%s)", ([job_id],)).fetchall() == [(job_id,)]
    after = conn.execute("SELECT id, expire_at, created_at FROM dispatch.jobs WHERE idempotency_key = 'order-1'").fetchone()
    assert after == before
    # The key is the revived job's again: a duplicate enqueue returns it, creating nothing.
    assert conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-1')").fetchone() == (job_id,)
    assert conn.execute("SELECT count(*) FROM dispatch.jobs").fetchone() == (1,)


def test_reviving_an_expired_job_needs_a_new_expiry(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', expire_at => now() - interval '1 second')")
    (job_id, token, _, expired), = claim(conn)
    assert expired is True
    finish(conn, [(job_id, token, "dead")], reason="expired")
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    assert conn.execute("SELECT dispatch.retry_dead(%s)", ([job_id],)).fetchall() == []  # skipped, said so
    assert notices == [f"dispatch.retry_dead: job {job_id} skipped: expired; give a new expire_at to revive it"]
    assert conn.execute("SELECT count(*) FROM dispatch.dead_jobs").fetchone() == (1,)  # nothing lost
    with pytest.raises(psycopg.errors.CheckViolation, match="already past"):
        conn.execute("SELECT dispatch.retry_dead(%s, expire_at => now() - interval '1 s')", ([job_id],))
    conn.execute("SELECT dispatch.retry_dead(%s, expire_at => now() + interval '1 day')", ([job_id],))
    assert conn.execute("SELECT expire_at > now() + interval '23 hours' FROM dispatch.jobs").fetchone() == (True,)


def test_reviving_a_job_whose_key_is_taken_again_is_refused(conn: Conn) -> None:
    conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-2')")
    (job_id, token, _, _), = claim(conn)
    finish(conn, [(job_id, token, "dead")], reason="discarded")
    conn.execute("DELETE FROM dispatch.idempotency_keys")  # the dedupe window passed...
    other = conn.execute("SELECT dispatch.enqueue('k', idempotency_key => 'order-2')").fetchone()
    assert other is not None and other[0] != job_id  # ...and a new job took the key
    assert conn.execute("SELECT revived, reason FROM dispatch.retry_dead_v2(%s)", ([job_id],)).fetchall() == [
        (False, f"its idempotency key 'order-2' is held by job {other[0]}")]
    assert conn.execute("SELECT count(*) FROM dispatch.dead_jobs").fetchone() == (1,)


# -- 4. request attempts are masked ----------------------------------------------------------------

def test_request_attempts_mask_response_bodies_headers_and_errors(db_url: str) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLURPLU5PVC1MRUFL"
    detail = {"response_body": json.dumps({"access_token": "at-DO-NOT-LEAK", "id": 7, "jwt": jwt})
              + " redirect=https://x/?token=qs-DO-NOT-LEAK&ok=1 Authorization: Bearer br-DO-NOT-LEAK",
              "response_headers": {"set-cookie": "sess=ck-DO-NOT-LEAK", "content-type": "json"}}
    execute(db_url, """INSERT INTO dispatch.job_history (job_id, attempt, queue, kind, outcome, error, detail)
                       VALUES (1, 1, 'requests', 'http.request', 'retried', %s, %s)""",
            ("HTTP 500: {\"password\": \"pw-DO-NOT-LEAK\"}", json.dumps(detail)))
    with login(db_url, "reader") as c:
        rows = c.execute("SELECT * FROM dispatch.request_attempts").fetchall()
    seen = json.dumps(rows, default=str)
    assert "DO-NOT-LEAK" not in seen, seen
    body = rows[0][8]
    assert '"id": 7' in body and "ok=1" in body and rows[0][9]["content-type"] == "json"  # the rest stays readable


# -- 5. a queue's concurrency cap frees its slot at once --------------------------------------------

async def test_a_capped_queue_claims_again_as_soon_as_one_of_its_jobs_finishes(db_url: str) -> None:
    # Before: with the cap full and global slots free the loop slept until the next poll (60 s
    # here), so the 10 jobs never finished within the wait below.
    execute(db_url, "UPDATE dispatch.queues SET concurrency = 2 WHERE name = 'default'")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 't.quick' FROM generate_series(1, 10)")
    peak = running = 0

    async def quick(job: Job) -> Outcome:
        nonlocal peak, running
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return DONE

    async with running_worker(db_url, {"t.quick": quick}, poll_interval=60, queues=("default",)):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, timeout=10)
    assert peak == 2


# -- 6. outcomes not written yet keep their lease -------------------------------------------------

async def test_a_stalled_outcome_writer_keeps_finished_jobs_leased(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the job left the running set before its outcome was written and heartbeats no
    # longer extended it; past the lease it was rescued and ran a second time.
    runs = 0
    unblock = asyncio.Event()
    real_finish = Engine.finish

    async def stalled_finish(self: Engine, batch: list[Any]) -> int:
        await unblock.wait()
        return await real_finish(self, batch)

    async def once(job: Job) -> Outcome:
        nonlocal runs
        runs += 1
        return DONE

    monkeypatch.setattr(Engine, "finish", stalled_finish)
    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.once')")
    async with running_worker(db_url, {"t.once": once}, lease_seconds=1, rescue_interval=0.1) as runner:
        await wait_until(lambda: runs == 1 and runner.writer.pending == 1)
        # Kept alive for well past two lease periods while the writer is stuck...
        await wait_until(lambda: scalar(
            db_url, "SELECT lease_expires_at > leased_at + interval '2.5 seconds' FROM dispatch.jobs"), timeout=10)
        unblock.set()
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
    assert runs == 1
    assert scalar(db_url, "SELECT string_agg(outcome, ',') FROM dispatch.job_history") == "completed"


# -- 7. rescued attempts back off ---------------------------------------------------------------

def test_rescue_backs_off_like_a_retry(conn: Conn) -> None:
    # Before: a rescued job was available at once, so a job that kills its worker took one
    # down every lease period for its whole budget.
    conn.execute("UPDATE dispatch.queues SET backoff_base = '10 s', backoff_jitter = 0 WHERE name = 'default'")
    conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('k')")
    for attempt, wait in ((1, 10), (2, 20)):
        (_, _, got, _), = claim(conn)
        assert got == attempt
        conn.execute("UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 s'")
        assert conn.execute("SELECT dispatch.rescue_expired_v2()").fetchone() == (1,)
        row = conn.execute("SELECT state::text, round(extract(epoch FROM run_at - now())) FROM dispatch.jobs").fetchone()
        assert row == ("scheduled", wait)
        assert claim(conn) == []  # not before its time
        conn.execute("UPDATE dispatch.jobs SET run_at = now()")


# -- 8. a job that expired in flight is accepted, and dies 'expired' without running --------------

async def test_jobs_already_expired_at_insert_are_accepted_and_die_expired(db_url: str) -> None:
    # Before: each of these inserts raised, rolling back the producer's own transaction.
    with psycopg.connect(db_url) as producer:  # one business transaction
        producer.execute("CREATE TABLE public.orders (id int)")
        producer.execute("INSERT INTO public.orders VALUES (1)")
        producer.execute("INSERT INTO dispatch.jobs (kind, expire_at) VALUES ('t.never', now() - interval '1 s')")
        producer.execute("SELECT dispatch.enqueue('x.unknown', expire_at => now() - interval '1 s')")
        producer.execute("SELECT dispatch.send_request('GET', 'https://a.example/', expire_at => now() - interval '1 s')")
    assert scalar(db_url, "SELECT count(*) FROM public.orders") == 1

    async def never(job: Job) -> Outcome:
        raise AssertionError("an expired job must never run")

    # This worker knows neither x.unknown nor http.request: expired jobs die all the same.
    async with running_worker(db_url, {"t.never": never}):
        await wait_until(lambda: len(_dead(db_url)) == 3)
    assert {(kind, reason) for _, kind, reason in _dead(db_url)} == {
        ("t.never", "expired"), ("x.unknown", "expired"), ("http.request", "expired")}


def test_malformed_expiry_is_still_refused(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidDatetimeFormat):
        conn.execute("INSERT INTO dispatch.jobs (kind, expire_at) VALUES ('k', 'yesterday-ish')")


# -- 9. smaller findings ------------------------------------------------------------------------

def test_worker_status_follows_each_workers_lease(conn: Conn) -> None:
    # Before: 30 s hard-coded, so a --lease 90s worker (heartbeat every 30 s) flickered to lost.
    conn.execute("""INSERT INTO dispatch.workers (id, host, pid, version, queues, slots, lease_seconds, heartbeat_at)
                    VALUES ('slow', 'h', 1, 0, '{*}', 1, 90, now() - interval '40 s'),
                           ('fast', 'h', 2, 0, '{*}', 1, 30, now() - interval '40 s')""")
    assert conn.execute("SELECT id, status FROM dispatch.worker_status ORDER BY id").fetchall() == [
        ("fast", "lost"), ("slow", "alive")]


async def test_an_invalidation_during_a_load_is_not_lost() -> None:
    # Before: the signing-key cache stored what a load returned even when the key was rotated
    # (NOTIFY) while that load was in flight: the old key stayed for the whole TTL.
    version = 1
    loading = asyncio.Event()
    release = asyncio.Event()

    async def load(name: str) -> int:
        value = version
        loading.set()
        await release.wait()
        return value

    cache: KeyedCache[str, int] = KeyedCache(load, ttl=3600)
    first = asyncio.gather(*(cache.get("k") for _ in range(5)))  # five misses, one load
    await loading.wait()
    version = 2
    cache.invalidate()  # the NOTIFY of the rotation lands during the load
    release.set()
    assert await first == [1] * 5
    assert await cache.get("k") == 2
    assert cache.counters.loads == 2 and cache.counters.invalidations == 1


# Versioned functions redefined in place, on purpose, with the same signature: each keeps its
# contract with the workers of earlier releases that still call it, and makes them safe.
GUARDED_IN_PLACE = {
    # A late finish from an earlier release's worker must change nothing, and its workers must
    # leave a step that only a newer version of the type has (the second review, items 2-3).
    ("0017_processes_review.sql", "dispatch.take_process_step_v1"),
    ("0017_processes_review.sql", "dispatch.finish_process_step_v1"),
    ("0017_processes_review.sql", "dispatch.take_process_steps_v2"),
    ("0017_processes_review.sql", "dispatch.finish_process_steps_v2"),
    # An operator's restart at a named step stamps it with the newest version (the one whose
    # steps the name was checked against).
    ("0017_processes_review.sql", "dispatch.restart_process_v1"),
    # ...and schedule (at a constant cost) and rescue (a request by its own interval) as the
    # successor does, by calling it.
    ("0018_retention.sql", "dispatch.schedule_command_v1"),
    ("0019_engine_review.sql", "dispatch.rescue_expired_v2"),
}


def test_migrations_never_redefine_a_versioned_function_in_place() -> None:
    # Versioned functions (name_vN) are a contract with running workers of other releases: a
    # change is a new _vN+1. 0003 broke the rule before it was checked; it stays as it landed
    # (it is applied in deployed databases), and this test keeps it from happening again. The
    # exceptions above keep their signature, which is checked too.
    defined: dict[str, tuple[str, str]] = {}
    pattern = r"CREATE (?:OR REPLACE )?FUNCTION (dispatch\.\w+_v\d+)(\([^)]*\)\s*RETURNS\s+[\w. ()\[\],]+?)\s*\n"
    for path in sql.migration_files():
        for name, signature in re.findall(pattern, path.read_text()):
            signature = " ".join(signature.split())
            if name in defined and path.name != "0003_release_delay.sql":
                if (path.name, name) not in GUARDED_IN_PLACE:
                    raise AssertionError(f"{path.name} redefines {name} from {defined[name][0]}")
                assert signature == defined[name][1], f"{path.name} changes the signature of {name}"
            defined.setdefault(name, (path.name, signature))


async def test_a_dead_outcome_writer_is_restarted(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a bug that killed the writer task left outcomes unwritten and hung shutdown.
    real_finish = Engine.finish
    failures = 0

    async def buggy_once(self: Engine, batch: list[Any]) -> int:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("a bug in the writer")
        return await real_finish(self, batch)

    async def ok(job: Job) -> Outcome:
        return DONE

    monkeypatch.setattr(Engine, "finish", buggy_once)
    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('t.ok')")
    async with running_worker(db_url, {"t.ok": ok}):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
    assert failures == 1


async def test_the_listener_gives_up_on_a_server_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    # Before: no connect timeout, so a black-holed server hung the LISTEN connection forever.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def nothing() -> None:
        return None

    listener = Listener(f"postgresql://u@127.0.0.1:{port}/db", ["c"], on_notify=lambda c, p: None,
                        on_reconnect=nothing, connect_timeout=1)
    caplog.set_level(logging.WARNING, logger="pgdispatch.notify.listener")
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: "listener connection lost" in caplog.text, timeout=10)
        assert not listener.connected.is_set()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for w in accepted:
            w.close()
        server.close()


@pytest.mark.chaos
def test_worker_processes_stop_when_the_pool_is_killed(db_url: str) -> None:
    # Before: a SIGKILLed pool left its children claiming jobs with nobody to supervise them.
    from tests.test_pool import wait_for

    env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"}
    pool = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--processes", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.workers") == 2, 30)
        registered = {r[0] for r in psycopg.connect(db_url).execute("SELECT pid FROM dispatch.workers").fetchall()}
        children = [p.pid for p in psutil.Process(pool.pid).children() if p.pid in registered]
        assert len(children) == 2
        pool.send_signal(signal.SIGKILL)
        pool.wait()

        def gone(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: all(gone(pid) for pid in children), 30)
        assert scalar(db_url, "SELECT count(*) FROM dispatch.worker_status WHERE status = 'stopped'") == 2
    finally:
        if pool.poll() is None:
            pool.kill()


async def test_a_burst_of_notifies_is_claimed_in_a_few_claims(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: every NOTIFY (one per inserting transaction) caused its own claim in every worker.
    claims = 0
    real_claim = Engine.claim

    async def counted(self: Engine, queue: str, kinds: list[str], max_jobs: int) -> list[Job]:
        nonlocal claims
        claims += 1
        return await real_claim(self, queue, kinds, max_jobs)

    async def ok(job: Job) -> Outcome:
        return DONE

    monkeypatch.setattr(Engine, "claim", counted)
    async with running_worker(db_url, {"t.ok": ok}, poll_interval=60, fetch_cooldown=0.5,
                              queues=("default",)):
        claims = 0
        with psycopg.connect(db_url, autocommit=True) as producer:
            for _ in range(30):  # 30 transactions, 30 NOTIFYs
                producer.execute("INSERT INTO dispatch.jobs (kind) VALUES ('t.ok')")
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history") == 30)
    assert claims <= 8, claims


def test_production_workers_do_not_run_debug_kinds() -> None:
    from pgdispatch.worker.executors import builtin_executors
    from pgdispatch.worker.executors.context import ExecutorContext
    from pgdispatch.worker.outbound.signing import SigningKeys

    context = ExecutorContext(http=None, keys=SigningKeys("postgresql://unused"), limits=None)  # type: ignore[arg-type]
    assert not [k for k in builtin_executors(context) if k.startswith("debug.")]
    assert "debug.noop" in builtin_executors(context, debug_kinds=True)


# -- new-user findings ----------------------------------------------------------------------------

async def test_a_worker_with_no_queue_serves_every_queue_including_new_ones(db_url: str) -> None:
    async def ok(job: Job) -> Outcome:
        return DONE

    execute(db_url, "SELECT dispatch.send_request('GET', 'https://a.example/')")  # queue 'requests'
    async with running_worker(db_url, {"t.ok": ok, "http.request": ok}) as runner:
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
        execute(db_url, "INSERT INTO dispatch.queues (name) VALUES ('created-later')")
        await wait_until(lambda: "created-later" in runner.queues())
        execute(db_url, "INSERT INTO dispatch.jobs (queue, kind) VALUES ('created-later', 't.ok')")
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0)
        assert scalar(db_url, "SELECT queues FROM dispatch.workers") == ["*"]


async def test_waiting_without_worker_names_kinds_no_live_worker_knows(db_url: str) -> None:
    async def ok(job: Job) -> Outcome:
        return DONE

    execute(db_url, "INSERT INTO dispatch.jobs (kind) VALUES ('x.unknown'), ('t.ok')")
    async with running_worker(db_url, {"t.ok": ok}):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1)
        with psycopg.connect(db_url) as c:
            rows = c.execute(sql.read("inspect/waiting_without_worker.sql")).fetchall()
    assert [(r[0], r[1], r[3]) for r in rows] == [("default", "x.unknown", 1)]


async def test_maintenance_prunes_old_dead_letters_and_keys_batch_by_batch(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pgdispatch.worker.engine as engine_module
    monkeypatch.setattr(engine_module, "PRUNE_BATCH", 10)  # 25 old rows: three batches
    execute(db_url, """INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, version, attempt,
                           reason, created_at, died_at)
                       SELECT i, 'default', 'k', '{}', 0, 0, 1, 'discarded', now() - interval '60 days',
                              CASE WHEN i <= 25 THEN now() - interval '40 days' ELSE now() END
                       FROM generate_series(1, 26) i""")
    execute(db_url, """INSERT INTO dispatch.idempotency_keys (queue, key, job_id, expires_at)
                       SELECT 'default', 'k' || i, i, now() - interval '1 s' FROM generate_series(1, 25) i""")
    pool = AsyncConnectionPool(db_url, open=False, kwargs={"autocommit": True})
    await pool.open()
    try:
        engine = Engine(pool, database_url=db_url, worker_id="w", version=0, lease_seconds=30)
        await engine.maintain(history_keep_seconds=14 * 86400, dead_keep_seconds=30 * 86400)
    finally:
        await pool.close()
    assert scalar(db_url, "SELECT array_agg(job_id) FROM dispatch.dead_jobs") == [26]  # the recent one stays
    assert scalar(db_url, "SELECT count(*) FROM dispatch.idempotency_keys") == 0


def test_the_heartbeat_never_waits_for_a_row_the_outcome_writer_holds(db_url: str) -> None:
    """Seen under load: the heartbeat and the outcome writer locked the same jobs in different
    orders and deadlocked. A row locked now is skipped: not extended, not reported lost."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        tokens = [uuid.uuid4(), uuid.uuid4()]
        ids = [r[0] for r in conn.execute(
            """INSERT INTO dispatch.jobs (kind, state, lease_token, leased_by, leased_at, lease_expires_at)
               SELECT 't.k', 'running', t, 'w', now(), now() + interval '5 seconds' FROM unnest(%s::uuid[]) t
               RETURNING id""", (tokens,)).fetchall()]
        gone = uuid.uuid4()  # a lease this worker no longer holds
        with psycopg.connect(db_url) as writer:
            writer.execute("SELECT 1 FROM dispatch.jobs WHERE id = %s FOR UPDATE", (ids[0],))  # mid-finish
            conn.execute("SET lock_timeout = '2s'")  # v1 waited here, then failed
            lost = conn.execute(sql.query("extend_leases"), {"tokens": [*tokens, gone], "lease_seconds": 60}).fetchall()
            assert lost == [(gone,)]
            writer.rollback()
        expiry = dict(conn.execute("SELECT id, lease_expires_at > now() + interval '30 seconds' FROM dispatch.jobs"
                                   ).fetchall())
        assert expiry == {ids[0]: False, ids[1]: True}


def test_no_function_is_executable_by_public(db_url: str) -> None:
    """Every SECURITY DEFINER function acts with the owner's rights: only the roles it is
    granted to may call it."""
    with psycopg.connect(db_url) as conn:
        callable_by_anyone = conn.execute(
            """SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
               WHERE n.nspname = 'dispatch' AND has_function_privilege('public', p.oid, 'EXECUTE')
               ORDER BY 1""").fetchall()
    assert callable_by_anyone == []
