"""The second review of processes (issue 19, items 2, 3 and 23), against a real PostgreSQL, with
plain SQL as workers of two releases (and two versions of a process type) would send it. Each
test says how it failed before its fix."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[tuple[Any, ...]]

STEPS_V1 = ["s1", "s2", "s3"]


def register(conn: Conn, version: int, steps: list[str], key: str = "pay") -> None:
    conn.execute("SELECT dispatch.register_process_type_v1(%s, 'PAY', %s, %s, 'default')", (key, version, steps))


def claim(conn: Conn, worker: str, kind: str = "process:pay") -> tuple[int, uuid.UUID, dict[str, Any]]:
    rows = conn.execute("SELECT id, lease_token, args FROM dispatch.claim_jobs_v2(%s, 'default', %s, 0, 1, '30 s')",
                        (worker, [kind])).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0], rows[0][1], rows[0][2]


def take_v2(conn: Conn, pid: int, run_seq: int, version: int, steps: list[str]) -> tuple[Any, ...]:
    row = conn.execute("SELECT outcome, step, attempt, detail FROM dispatch.take_process_steps_v2("
                       "%s, %s, %s, %s, now())", ([pid], [run_seq], version, steps)).fetchone()
    assert row is not None
    return row


def finish_v2(conn: Conn, pid: int, run_seq: int, step: str, attempt: int, next_step: str | None,
              state: dict[str, Any], *, version: int = 1, continue_here: bool = True) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT status, step, attempt FROM dispatch.finish_process_steps_v2(%s, %s, %s, %s, %s, %s, '{done}', "
        "'{NULL}', '{NULL}', %s::jsonb[], %s, '{NULL}', '{NULL}', %s, now())",
        ([pid], [run_seq], [step], [attempt], version, [None], [Jsonb(state)], [next_step],
         [continue_here])).fetchall()


def finish_v3(conn: Conn, pid: int, run_seq: int, job: int, token: uuid.UUID, step: str, attempt: int,
              next_step: str | None, state: dict[str, Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT status, step, attempt FROM dispatch.finish_process_steps_v3(%s, %s, %s, %s, %s, %s, 1, %s, "
        "'{done}', '{charged the card}', '{NULL}', %s::jsonb[], %s, '{NULL}', '{NULL}', '{true}', now())",
        ([pid], [run_seq], [job], [token], [step], [attempt], [None], [Jsonb(state)], [next_step])).fetchall()


def instance(conn: Conn, pid: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT status::text, current_step, attempts, state FROM dispatch.processes WHERE id = %s",
                       (pid,)).fetchone()
    assert row is not None
    return row


def test_a_late_step_finish_neither_rewinds_the_instance_nor_runs_a_finished_step_again(conn: Conn) -> None:
    # Before: the finish matched only run_seq and status 'running'. When a step went on in the
    # same job, run_seq stayed the same, so the finish of step 1 by a worker that had lost its
    # lease moved an instance a newer owner had taken to step 3 back to step 2, overwrote its
    # state, and step 2 ("charged the card") ran again.
    register(conn, 1, STEPS_V1)
    pid = conn.execute("SELECT dispatch.start_process('pay', '{}')").fetchone()[0]  # type: ignore[index]
    job, token_a, _ = claim(conn, "worker-a")
    assert take_v2(conn, pid, 1, 1, STEPS_V1)[:3] == ("take", "s1", 1)
    # Worker A stalls past its lease (a GC pause, a partition); the job is rescued and B takes it.
    conn.execute("UPDATE dispatch.jobs SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (job,))
    conn.execute("SELECT dispatch.rescue_expired_v2()")
    conn.execute("UPDATE dispatch.jobs SET run_at = now() WHERE id = %s", (job,))
    same_job, token_b, _ = claim(conn, "worker-b")
    assert same_job == job and token_b != token_a
    assert take_v2(conn, pid, 1, 1, STEPS_V1)[:3] == ("take", "s1", 2)
    assert finish_v2(conn, pid, 1, "s1", 2, "s2", {"s1": "b"}) == [("running", "s2", 1)]
    assert finish_v2(conn, pid, 1, "s2", 1, "s3", {"charged": True}) == [("running", "s3", 1)]
    # A's late finish of step 1, as a worker of the previous release sends it (v2)...
    assert finish_v2(conn, pid, 1, "s1", 1, "s2", {"s1": "a", "charged": False}) == []
    assert instance(conn, pid) == ("running", "s3", 1, {"s1": "b", "charged": True})
    # ...and as this release sends it (v3, with its lease): refused, and kept in the journal.
    assert finish_v3(conn, pid, 1, job, token_a, "s1", 1, "s2", {"charged": False}) == [("late", "s1", 1)]
    assert instance(conn, pid) == ("running", "s3", 1, {"s1": "b", "charged": True})
    journal = conn.execute("SELECT step, attempt, status, message FROM dispatch.process_history "
                           "WHERE process_id = %s ORDER BY id", (pid,)).fetchall()
    assert [row[:3] for row in journal] == [("s1", 2, "done"), ("s2", 1, "done"), ("s1", 1, "late")]
    assert journal[-1][3].startswith("done, not applied: the instance had moved on")
    # B, the lease's holder, finishes the last step; a take with A's stale lease takes nothing.
    assert finish_v3(conn, pid, 1, job, token_b, "s3", 1, None, {"s3": True}) == [("done", None, 0)]
    assert conn.execute("SELECT count(*) FROM dispatch.take_process_steps_v3(%s, '{1}', %s, %s, 1, %s, now())",
                        ([pid], [job], [token_a], STEPS_V1)).fetchone() == (0,)


def test_an_older_worker_leaves_a_step_only_a_newer_version_has_to_the_newer_one(conn: Conn) -> None:
    # Before: the version guard compared only the version the instance started on. Once a v2
    # worker moved it into s1b, a step only v2 has, a v1 worker still running (a rolling deploy,
    # a rollback) took the step job and put the instance in error: "step 's1b' does not exist in
    # version 1".
    register(conn, 1, ["s1", "s2"])
    pid = conn.execute("SELECT dispatch.start_process('pay', '{}')").fetchone()[0]  # type: ignore[index]
    claim(conn, "v2-worker")
    v2_steps = ["s1", "s1b", "s2"]
    assert take_v2(conn, pid, 1, 2, v2_steps)[:3] == ("take", "s1", 1)
    assert finish_v2(conn, pid, 1, "s1", 1, "s1b", {}, version=2, continue_here=False) == [("pending", "s1b", 0)]
    # The step job carries the version that wrote it, so an older worker can leave it unopened...
    _, _, args = claim(conn, "v1-worker")
    assert args["version"] == 2 and args["run_seq"] == 2
    # ...and the instance says the same to an older worker that asks anyway.
    outcome, step, _, detail = take_v2(conn, pid, 2, 1, ["s1", "s2"])
    assert (outcome, step) == ("newer", "s1b")
    assert detail == ("process 1 stands at step s1b, where pay version 2 moved it; this worker runs version 1 "
                      "and leaves it to a newer one").replace("process 1", f"process {pid}")
    assert instance(conn, pid)[:2] == ("pending", "s1b")
    assert take_v2(conn, pid, 2, 2, v2_steps)[:3] == ("take", "s1b", 1)


def test_moving_the_quiet_window_releases_the_steps_deferred_to_its_old_end(conn: Conn) -> None:
    # Before: deferred step jobs kept the old window's end (1,749 s left 45 s after the window
    # was moved away).
    register(conn, 1, STEPS_V1)
    conn.execute("UPDATE dispatch.process_settings SET time_zone = 'UTC', "
                 "quiet_start = (now() AT TIME ZONE 'UTC' - interval '1 minute')::time, "
                 "quiet_end = (now() AT TIME ZONE 'UTC' + interval '30 minutes')::time")
    pid = conn.execute("SELECT dispatch.start_process('pay', '{}')").fetchone()[0]  # type: ignore[index]
    job, token, _ = claim(conn, "w")
    outcome, wait = conn.execute(
        "SELECT outcome, wait_seconds FROM dispatch.take_process_steps_v3(%s, '{1}', %s, %s, 1, %s, now())",
        ([pid], [job], [token], STEPS_V1)).fetchone()  # type: ignore[misc]
    assert outcome == "quiet" and 25 * 60 < wait <= 30 * 60
    conn.execute("SELECT dispatch.finish_jobs_v2(%s, %s, '{release}', %s, '{NULL}', '{quiet}', '{NULL}', "
                 "'{NULL}')", ([job], [token], [wait]))
    assert conn.execute("SELECT run_at > now() + interval '25 minutes' FROM dispatch.jobs").fetchone() == (True,)
    conn.execute("UPDATE dispatch.process_settings SET "
                 "quiet_start = (now() AT TIME ZONE 'UTC' + interval '6 hours')::time, "
                 "quiet_end = (now() AT TIME ZONE 'UTC' + interval '6 hours 10 minutes')::time")
    assert conn.execute("SELECT run_at <= now() FROM dispatch.jobs").fetchone() == (True,)
    assert claim(conn, "w")[0] == job  # runnable at once
