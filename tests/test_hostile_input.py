"""Hostile values from a producer (issue 19, item 10; items 11-14 are in test_limits_review.py):
a producer role is another system we do not control. Each test says how it failed before."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import DONE, Outcome
from tests.helpers import execute, running_worker, scalar, wait_until

DEEP = "[" * 10_000 + "]" * 10_000


def test_absurd_nesting_is_refused_at_insert(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    # Before: dispatch.enqueue accepted 10,000 nested arrays.
    with pytest.raises(psycopg.errors.CheckViolation, match="job_args_nesting_at_most_100"):
        conn.execute("SELECT dispatch.enqueue('k', jsonb_build_object('d', %s::jsonb))", (DEEP,))
    nested = "[" * 99 + "]" * 99  # under the bound: 100 levels with the object around it
    assert conn.execute("SELECT dispatch.enqueue('k', jsonb_build_object('d', %s::jsonb))", (nested,)).fetchone()


async def test_a_job_whose_args_cannot_be_decoded_dies_alone_and_its_batch_runs(db_url: str) -> None:
    # A row written before the check (dropped here to plant it). Before: every claim that
    # included it failed with "maximum recursion depth exceeded", the whole batch was rescued
    # again and again, and the jobs beside it had not run after 30 s, each charged 3 attempts.
    execute(db_url, "ALTER TABLE dispatch.jobs DROP CONSTRAINT job_args_nesting_at_most_100")
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'k', '{\"n\": 1}' FROM generate_series(1, 3)")
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('k', jsonb_build_object('d', %s::jsonb))", (DEEP,))
    execute(db_url, "INSERT INTO dispatch.jobs (kind, args) SELECT 'k', '{\"n\": 2}' FROM generate_series(1, 3)")

    async def ok(job: Job) -> Outcome:
        return DONE

    async with running_worker(db_url, {"k": ok}, lease_seconds=2):
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 10)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE outcome = 'completed' AND attempt = 1") == 6
    dead = psycopg.connect(db_url).execute("SELECT reason, last_error FROM dispatch.dead_jobs").fetchall()
    assert len(dead) == 1 and dead[0][0] == "invalid"
    assert dead[0][1].startswith("its args cannot be decoded: RecursionError")
