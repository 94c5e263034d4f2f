"""Processes (seed 001): steps by name, the journal, retries and errors, operators, versions.
The sample type is tests/sample_app/orders.py."""

from __future__ import annotations

import collections
import os
import uuid
from typing import Any

import psycopg
import pytest

import pgdispatch
from tests.helpers import scalar, wait_for
from tests.sample_app.orders import app as orders


async def test_a_process_runs_its_steps_in_order_and_journals_them(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        pid = await orders.start_process(conn, "create_order", {"items": ["a", "b"], "customer": "c-9"},
                                         idempotency_key="order-9")
        assert await orders.start_process(conn, "create_order", {}, idempotency_key="order-9") == pid
        result = await orders.drain(conn)
        # One job ran the three steps: an instance that goes on without waiting keeps its slot.
        assert result.completed == 1 and result.attempts[0][1].detail["steps"] == 3  # type: ignore[union-attr]
        row = await (await conn.execute("SELECT status::text, current_step, state FROM dispatch.processes")).fetchone()
        assert row == ("done", None, {"items": ["a", "b"], "customer": "c-9", "validated": True, "reservation": "R-1"})
        journal = await (await conn.execute(
            "SELECT step, attempt, status, message, payload, version FROM dispatch.process_history ORDER BY id")).fetchall()
        assert journal == [
            ("validate", 1, "done", "valid", None, 1),
            ("reserve", 1, "done", "reserved 2 items", {"items": ["a", "b"]}, 1),
            ("notify", 1, "done", "customer c-9 notified", {"to": "c-9", "api_key": "***"}, 1)]


async def test_retries_then_error_then_an_operator_restart(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        pid = await pgdispatch.start_process(conn, "create_order",
                                             {"items": ["a"], "customer": "c", "stock_down": True})
        await orders.drain(conn, with_scheduled=True)
        row = await (await conn.execute("SELECT status::text, current_step, attempts, error FROM dispatch.processes")).fetchone()
        assert row == ("error", "reserve", 3, "the stock service is down (attempt 3 of 3)")
        statuses = [r[0] for r in await (await conn.execute(
            "SELECT status FROM dispatch.process_history WHERE step = 'reserve' ORDER BY id")).fetchall()]
        assert statuses == ["retry", "retry", "error"]
        await conn.execute("UPDATE dispatch.processes SET state = state || '{\"stock_back\": true}'")
        await conn.execute("SELECT dispatch.restart_process_v1(%s, NULL, 'ops@host', 'stock is back')", (pid,))
        await orders.drain(conn)
        assert await (await conn.execute("SELECT status::text FROM dispatch.processes")).fetchone() == ("done",)
        audit = await (await conn.execute("SELECT who, action, target, reason FROM dispatch.audit_log")).fetchall()
        assert audit == [("ops@host", "restart", f"process:{pid}", "stock is back")]


async def test_a_step_error_stops_until_restarted_and_operators_mistakes_are_refused(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        failing = await orders.start_process(conn, "create_order", {"customer": "c"})
        done = await orders.start_process(conn, "create_order", {"items": ["x"], "customer": "d"})
        await orders.drain(conn, with_scheduled=True)
        row = await (await conn.execute("SELECT status::text, current_step, error FROM dispatch.processes "
                                        "WHERE id = %s", (failing,))).fetchone()
        assert row == ("error", "validate", "an order needs items")
        with pytest.raises(pgdispatch.InvalidInput, match="unknown process type nope; registered: create_order"):
            await pgdispatch.start_process(conn, "nope")
        with pytest.raises(pgdispatch.InvalidInput, match="is done: only a process in error or retry can be restarted"):
            await _call(conn, "SELECT dispatch.restart_process_v1(%s, NULL, 'me', NULL)", done)
        with pytest.raises(pgdispatch.InvalidInput, match="no step nowhere in create_order; its steps: validate, reserve, notify"):
            await _call(conn, "SELECT dispatch.restart_process_v1(%s, 'nowhere', 'me', NULL)", failing)
        with pytest.raises(pgdispatch.InvalidInput, match="needs a reason"):
            await _call(conn, "SELECT dispatch.abandon_process_v1(%s, 'me', '')", failing)
        await _call(conn, "SELECT dispatch.abandon_process_v1(%s, 'me', 'customer cancelled')", failing)
        assert scalar(db_url, "SELECT status::text FROM dispatch.processes WHERE id = %s", (failing,)) == "abandoned"
        assert (await orders.drain(conn)).total == 0


async def _call(conn: psycopg.AsyncConnection[tuple[object, ...]], query: str, pid: int) -> None:
    from pgdispatch.db.errors import translated

    with translated():
        await conn.execute(query, (pid,))


def _orders_app(version: int, steps: list[str]) -> pgdispatch.App:
    """CREATE ORDER as another release would ship it."""
    app = pgdispatch.App()

    async def ok(self: object, state: dict[str, object]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone(f"ok on v{version}")

    async def stock_down(self: object, state: dict[str, object]) -> pgdispatch.StepRetry:
        return pgdispatch.StepRetry("the stock service is down", after=3600)

    body: dict[str, object] = {"steps": steps}
    for step in steps:
        body[step] = stock_down if (version == 1 and step == "reserve") else ok
    app.process("create_order", "CREATE ORDER", version=version)(type(f"CreateOrderV{version}", (), body))
    return app


async def test_an_upgrade_resumes_by_step_name_runs_new_steps_and_names_a_removed_one(db_url: str) -> None:
    v1 = _orders_app(1, ["validate", "reserve", "notify"])
    v2 = _orders_app(2, ["validate", "reserve", "check_fraud", "notify"])  # a new step
    v3 = _orders_app(3, ["validate", "ship"])  # reserve removed
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await v1.register(conn)
        upgraded = await v1.start_process(conn, "create_order", {"n": 1})
        stranded = await v1.start_process(conn, "create_order", {"n": 2})
        await v1.drain(conn)  # both validated on v1, then waiting for the stock service
        # Deploy v2: resumes at reserve by name, runs the new step, keeps what was done.
        await v2.register(conn)
        await conn.execute("UPDATE dispatch.jobs SET run_at = now(), state = 'available' "
                           "WHERE (args ->> 'process_id')::bigint = %s", (upgraded,))  # its retry comes due
        await v2.drain(conn)
        journal = await (await conn.execute(
            "SELECT step, status, version FROM dispatch.process_history WHERE process_id = %s ORDER BY id",
            (upgraded,))).fetchall()
        assert journal[0] == ("validate", "done", 1) and ("reserve", "retry", 1) in journal
        assert journal[-3:] == [("reserve", "done", 2), ("check_fraud", "done", 2), ("notify", "done", 2)]
        assert [r for r in journal if r[0] == "validate"] == [("validate", "done", 1)]  # never again
        row = await (await conn.execute("SELECT status::text, version FROM dispatch.processes WHERE id = %s",
                                        (upgraded,))).fetchone()
        assert row == ("done", 1)  # it records the version it started with
        # Deploy v3 with reserve gone: the stranded instance stops with a message, never skips.
        await v3.register(conn)
        await v3.drain(conn, with_scheduled=True)
        row = await (await conn.execute("SELECT status::text, current_step, error FROM dispatch.processes "
                                        "WHERE id = %s", (stranded,))).fetchone()
        assert row[:2] == ("error", "reserve")
        assert row[2].startswith(f"step 'reserve' of process {stranded} (started on version 1) does not exist "
                                 "in create_order version 3; its steps: validate, ship")
        await _call(conn, "SELECT dispatch.restart_process_v1(%s, 'ship', 'me', 'reserve moved into ship')", stranded)
        await v3.drain(conn)
        assert scalar(db_url, "SELECT status::text FROM dispatch.processes WHERE id = %s", (stranded,)) == "done"
        # An older worker never runs an instance started on a newer version.
        newer = await v3.start_process(conn, "create_order", {"n": 3})
        result = await v1.drain(conn)
        assert result.released == 1 and result.completed == 0
        assert scalar(db_url, "SELECT count(*) FROM dispatch.process_history WHERE process_id = %s", (newer,)) == 0


@pytest.mark.chaos
def test_kill_9_mid_step_resumes_at_that_step_and_never_reruns_a_finished_one(db_url: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    def start() -> subprocess.Popen[str]:
        env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"}
        return subprocess.Popen([sys.executable, "-m", "pgdispatch", "worker", "--app", "sample_app.orders:app",
                                 "--lease", "2s", "--rescue-interval", "0.5s", "--grace", "1s"],
                                cwd=Path(__file__).parent, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    pool = start()
    try:
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.process_types") == 1)
        with psycopg.connect(db_url, autocommit=True) as conn:
            pid = pgdispatch.start_process(conn, "create_order", {"items": ["a"], "customer": "k", "slow": 600})
        wait_for(lambda: scalar(db_url, "SELECT current_step || ':' || status FROM dispatch.processes") == "reserve:running")
        child = scalar(db_url, "SELECT pid FROM dispatch.workers WHERE stopped_at IS NULL")
        os.kill(pool.pid, signal.SIGKILL)
        os.kill(child, signal.SIGKILL)
        pool.communicate(timeout=30)
    finally:
        if pool.poll() is None:
            pool.kill()
    # The state says the stock answers quickly now; a new worker rescues the step after its lease.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE dispatch.processes SET state = state || '{\"slow\": 0}'")
    pool = start()
    try:
        wait_for(lambda: scalar(db_url, "SELECT status::text FROM dispatch.processes") == "done", 60)
    finally:
        pool.send_signal(signal.SIGTERM)
        pool.communicate(timeout=30)
    journal = psycopg.connect(db_url).execute(
        "SELECT step, attempt, status FROM dispatch.process_history WHERE process_id = %s ORDER BY id", (pid,)).fetchall()
    assert journal == [("validate", 1, "done"), ("reserve", 2, "done"), ("notify", 1, "done")]


def test_process_cli(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    import os

    from pgdispatch.console import main as cli

    async def setup() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await orders.register(conn)
            stuck = await orders.start_process(conn, "create_order", {"customer": "c"})
            waiting = await orders.start_process(conn, "create_order",
                                                 {"items": ["a"], "customer": "d", "stock_down": True})
            await orders.drain(conn)  # stuck: error at validate; waiting: retry at reserve
            return stuck, waiting

    stuck, waiting = asyncio.run(setup())
    os.environ["DATABASE_URL"] = db_url
    try:
        assert cli.main(["process", "list", "--status", "error", "--json"]) == 0
        assert f'"id": {stuck}' in capsys.readouterr().out
        assert cli.main(["process", "show", str(waiting)]) == 0
        out = capsys.readouterr().out
        assert "reserve" in out and "the stock service is down" in out and "sk-DO-NOT-LEAK" not in out
        assert cli.main(["process", "work", str(waiting)]) == 0
        assert cli.main(["process", "restart", str(stuck), "--from-step", "validate", "--reason", "items added"]) == 0
        assert cli.main(["process", "restart", str(stuck)]) == 2  # pending now: not in error or retry
        assert "only a process in error or retry can be restarted" in capsys.readouterr().err
        assert cli.main(["process", "abandon", str(waiting), "--reason", "duplicate order"]) == 0
        assert cli.main(["process", "abandon", str(waiting), "--reason", "again"]) == 2
        assert cli.main(["process", "show", "999999"]) == 3
        assert cli.main(["process", "work", str(waiting)]) == 2
    finally:
        del os.environ["DATABASE_URL"]
    audit = psycopg.connect(db_url).execute("SELECT action FROM dispatch.audit_log ORDER BY id").fetchall()
    assert audit == [("work",), ("restart",), ("abandon",)]


async def test_no_step_starts_in_the_quiet_window(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from pgdispatch.worker import processes

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        await conn.execute("UPDATE dispatch.process_settings SET time_zone = 'Europe/Warsaw', "
                           "quiet_start = '23:50', quiet_end = '00:00'")  # the default window
        pid = await orders.start_process(conn, "create_order", {"items": ["a"], "customer": "q"})
        # 23:55 in Warsaw: inside the default window, the last 10 minutes of the day.
        monkeypatch.setattr(processes, "now", lambda: datetime(2026, 11, 24, 22, 55, tzinfo=UTC))
        result = await orders.drain(conn)
        assert (result.completed, result.released) == (0, 1)
        job = await (await conn.execute("SELECT state::text, last_error, run_at > now() FROM dispatch.jobs")).fetchone()
        assert job == ("scheduled", "quiet window: no step starts until 2026-11-24T23:00:00+00:00", True)
        assert scalar(db_url, "SELECT attempts FROM dispatch.processes WHERE id = %s", (pid,)) == 0
        # After midnight the deferred step runs; nothing was dropped.
        monkeypatch.setattr(processes, "now", lambda: datetime(2026, 11, 24, 23, 0, 1, tzinfo=UTC))
        await orders.drain(conn, with_scheduled=True)
        assert scalar(db_url, "SELECT status::text FROM dispatch.processes") == "done"
        with pytest.raises(psycopg.errors.CheckViolation, match="Mars/Olympus is not a time zone name"):
            await conn.execute("UPDATE dispatch.process_settings SET time_zone = 'Mars/Olympus'")


@pytest.mark.parametrize(("status", "restart", "work", "abandon"), [
    ("pending", False, True, True),
    ("running", False, False, True),
    ("retry", True, True, True),
    ("error", True, True, True),
    ("done", False, False, False),
    ("abandoned", False, False, False),
])
async def test_operator_actions_from_each_status(db_url: str, status: str, restart: bool, work: bool,
                                                 abandon: bool) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        ids = [await orders.start_process(conn, "create_order", {"items": ["a"], "customer": "s"}) for _ in range(3)]
        await conn.execute("UPDATE dispatch.processes SET status = %s::dispatch.process_status", (status,))
        for pid, (query, allowed) in zip(ids, (
                ("SELECT dispatch.restart_process_v1(%s, NULL, 'me', 'test')", restart),
                ("SELECT dispatch.work_process_v1(%s, 'me')", work),
                ("SELECT dispatch.abandon_process_v1(%s, 'me', 'test')", abandon)), strict=True):
            if allowed:
                await _call(conn, query, pid)
            else:
                with pytest.raises(pgdispatch.InvalidInput):
                    await _call(conn, query, pid)
        statuses = [r[0] for r in await (await conn.execute(
            "SELECT status::text FROM dispatch.processes ORDER BY id")).fetchall()]
        assert statuses == [("pending" if restart else status), ("pending" if work else status),
                            ("abandoned" if abandon else status)]


def test_a_worker_steps_many_instances_together_and_a_refused_result_stops_only_its_own(db_url: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from tests.sample_app.tally import app as tally

    with psycopg.connect(db_url, autocommit=True) as conn:
        import asyncio

        async def register() -> None:
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
                await tally.register(aconn)

        asyncio.run(register())
        conn.execute("""SELECT dispatch.start_process('tally', jsonb_build_object('n', n))
                        FROM generate_series(1, 300) n""")
        poisoned = pgdispatch.start_process(conn, "tally", {"n": 1000, "poison": True})
    drained = subprocess.run([sys.executable, "-m", "pgdispatch", "worker", "--app", "sample_app.tally:app",
                              "--drain", "--concurrency", "200"],
                             cwd=Path(__file__).parent, env={**os.environ, "DATABASE_URL": db_url},
                             capture_output=True, text=True, timeout=120)
    assert drained.returncode == 0, drained.stderr
    with psycopg.connect(db_url) as conn:
        statuses = dict(conn.execute("SELECT status::text, count(*) FROM dispatch.processes GROUP BY 1").fetchall())
        assert statuses == {"done": 258, "error": 43}, statuses  # every seventh, and the refused one
        error = conn.execute("SELECT current_step, error FROM dispatch.processes WHERE id = %s", (poisoned,)).fetchone()
        assert error is not None and error[0] == "note"
        assert error[1].startswith("step note: its result could not be stored: UntranslatableCharacter")
        # Each step attempt journaled once: every seventh retries its note, then is in error.
        journals = conn.execute("""SELECT string_agg(h.step || ':' || h.status, ' ' ORDER BY h.id), count(*)
                                   FROM dispatch.process_history h JOIN dispatch.processes p ON p.id = h.process_id
                                   WHERE p.id <> %s GROUP BY p.id""", (poisoned,)).fetchall()
        assert {j: n for j, n in collections.Counter(j for j, _ in journals).items()} == {
            "count:done note:done close:done": 258, "count:done note:retry note:error": 42}
        assert conn.execute("SELECT count(*) FROM dispatch.processes WHERE state ? 'counted'").fetchone() == (301,)
        assert conn.execute("SELECT count(*) FROM dispatch.jobs").fetchone() == (0,)


async def test_one_batch_answers_each_instance_for_itself(db_url: str) -> None:
    """Instances in every situation in one take and one finish call: each gets its own answer."""
    import contextlib
    from collections.abc import AsyncIterator
    from datetime import UTC, datetime

    from pgdispatch.worker.processes import ProcessType, _Finish, _StepCalls, _Take

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await orders.register(conn)
        ready, moved_on, newer, renamed, done = [
            await orders.start_process(conn, "create_order", {"items": ["a"], "customer": "c"}) for _ in range(5)]
        await conn.execute("UPDATE dispatch.processes SET version = 2 WHERE id = %s", (newer,))
        await conn.execute("UPDATE dispatch.processes SET current_step = 'gone' WHERE id = %s", (renamed,))
        await conn.execute("UPDATE dispatch.processes SET status = 'done' WHERE id = %s", (done,))

        @contextlib.asynccontextmanager
        async def source() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
            yield conn

        ptype = next(p for p in orders.processes if p.key == "create_order")
        assert isinstance(ptype, ProcessType)
        calls = _StepCalls(ptype, source)
        # Each step job claimed, as a worker holds it: only its lease's holder takes the step.
        claimed = await (await conn.execute(
            "SELECT (args ->> 'process_id')::bigint, id, lease_token FROM dispatch.claim_jobs_v2("
            "'w', 'default', '{process:create_order}', 0, 10, '30 s')")).fetchall()
        lease = {pid: (job_id, token) for pid, job_id, token in claimed}
        lease[999_999] = (999_999, uuid.uuid4())
        taken = await calls._take([_Take(pid, seq, *lease[pid]) for pid, seq in [
            (ready, 1), (moved_on, 0), (ready, 1), (newer, 1), (renamed, 1), (done, 1), (999_999, 1)]]
                                  + [_Take(moved_on, 1, lease[ready][0], lease[moved_on][1])])
        assert [t["outcome"] for t in taken] == ["take", "skip", "take", "newer", "missing", "skip", "skip", "skip"]
        assert taken[0]["step"] == "validate" and taken[0]["attempt"] == 1 and taken[0]["state"]["customer"] == "c"
        assert "step 'gone' of process" in taken[4]["detail"]
        now = datetime.now(UTC)
        finished = await calls._finish([
            _Finish(ready, 1, *lease[ready], "validate", 1, now, "done", state=None, next_step="reserve",
                    continue_here=True),
            _Finish(newer, 1, *lease[newer], "validate", 1, now, "done", next_step="reserve", continue_here=True)])
        assert [f["status"] for f in finished] == ["running", "late"]
        assert (finished[0]["step"], finished[0]["attempt"]) == ("reserve", 1)
        journal = await (await conn.execute(
            "SELECT process_id, step, status FROM dispatch.process_history ORDER BY id")).fetchall()
        assert journal == [(renamed, "gone", "error"), (ready, "validate", "done"), (newer, "validate", "late")]
