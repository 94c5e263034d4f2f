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


def test_kind_and_args_are_checked_when_written_not_at_every_claim(db_url: str) -> None:
    # Issue 23: as CHECK constraints the rules on kind and args ran on every UPDATE of a job,
    # whatever it set, so each claim and finish re-ran the regular expression and walked the
    # args (a tenth of the server's CPU per no-op job). Now they run when a row is written with
    # them; a row from before them (planted here) is claimed, and refused only if rewritten.
    execute(db_url, "ALTER TABLE dispatch.jobs DISABLE TRIGGER jobs_validate_row")
    job = scalar(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('has space', '[1]') RETURNING id")
    execute(db_url, "ALTER TABLE dispatch.jobs ENABLE TRIGGER jobs_validate_row")
    claimed = scalar(db_url, "SELECT count(*) FROM dispatch.claim_jobs_v2('w', 'default', ARRAY['has space'], "
                             "0, 10, interval '30 s')")
    assert claimed == 1
    with pytest.raises(psycopg.errors.CheckViolation, match="job_kind_format") as refused:
        execute(db_url, "UPDATE dispatch.jobs SET kind = kind WHERE id = %s", (job,))
    assert refused.value.diag.constraint_name == "job_kind_format"
    with pytest.raises(psycopg.errors.CheckViolation, match="job_args_must_be_a_json_object"):
        execute(db_url, "INSERT INTO dispatch.jobs (kind, args) VALUES ('k', '[1]')")


async def test_a_job_whose_args_cannot_be_decoded_dies_alone_and_its_batch_runs(db_url: str) -> None:
    # A row written before the check (switched off here to plant it). Before: every claim that
    # included it failed with "maximum recursion depth exceeded", the whole batch was rescued
    # again and again, and the jobs beside it had not run after 30 s, each charged 3 attempts.
    execute(db_url, "ALTER TABLE dispatch.jobs DISABLE TRIGGER jobs_validate_row")
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
