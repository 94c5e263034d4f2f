"""Property-based bad input: whatever arrives is refused with a message naming the field, or
accepted and then run or dead-lettered as 'invalid'; nothing crashes, nothing valid is disturbed."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors.debug import EXECUTORS as DEBUG
from pgdispatch.worker.executors.http_request import HttpRequest
from pgdispatch.worker.outcome import InvalidJob
from pgdispatch.worker.runner import Runner
from tests.helpers import execute, scalar

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
# Texts PostgreSQL cannot store (NUL) are refused by the driver before reaching the server.
pg_text = st.text(max_size=140).filter(lambda t: "\x00" not in t)

KNOWN_REFUSALS = ("job_kind_format", "job_args_must_be_a_json_object", "job_priority_between",
                  "job_max_attempts_positive", "job_queue_must_exist", "job_idempotency_key_length",
                  "job_tenant_length", "kind must not be null", "args must be a JSON object",
                  "job_expire_at_after_created_at", "smallint out of range", "integer out of range",
                  "unsupported Unicode escape sequence", "job_args_at_most_1mb", "job_args_nesting_at_most_100")

settings.register_profile("pgdispatch", deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile("pgdispatch")


@given(kind=pg_text, args=json_values, priority=st.integers(-40000, 40000),
       max_attempts=st.none() | st.integers(-5, 5), queue=st.sampled_from(["default", "nope", ""]),
       key=st.none() | pg_text, tenant=st.none() | pg_text,
       expire_in=st.none() | st.integers(-10**6, 10**6))
def test_enqueue_refuses_clearly_or_stores_a_valid_job(conn: psycopg.Connection[tuple[object, ...]],
                                                        kind: str, args: Any, priority: int,
                                                        max_attempts: int | None, queue: str, key: str | None,
                                                        tenant: str | None, expire_in: int | None) -> None:
    try:
        row = conn.execute(
            "SELECT dispatch.enqueue(%s, %s, queue => %s, priority => %s, max_attempts => %s, "
            "idempotency_key => %s, tenant => %s, expire_at => CASE WHEN %s::int IS NULL THEN NULL "
            "ELSE now() + make_interval(secs => %s::int) END)",
            (kind, Jsonb(args), queue, priority, max_attempts, key, tenant, expire_in, expire_in)).fetchone()
    except psycopg.Error as exc:
        assert any(name in str(exc) for name in KNOWN_REFUSALS), str(exc)
        return
    assert row is not None
    stored = conn.execute("SELECT kind, args FROM dispatch.jobs WHERE id = %s", (row[0],)).fetchone()
    assert stored is not None and stored[0] == kind and isinstance(stored[1], dict)


@given(args=st.dictionaries(st.sampled_from(["method", "uri", "body", "claims", "signing_key",
                                             "success_code", "stop_codes", "attempt_interval",
                                             "http_timeout", "headers", "webhook_key"]),
                            json_values, max_size=11))
def test_a_stored_request_is_valid_or_invalid_never_a_crash(args: dict[str, Any]) -> None:
    try:
        request = HttpRequest.from_args(args)
    except InvalidJob:
        return
    assert request.method in {"GET", "POST", "PUT", "PATCH", "DELETE"} and 418 in request.stop_codes


@given(method=pg_text, uri=pg_text, stop_codes=st.lists(st.integers(-1000, 1000), max_size=4),
       headers=json_values)
def test_send_request_refuses_with_its_own_message(conn: psycopg.Connection[tuple[object, ...]], method: str,
                                                   uri: str, stop_codes: list[int], headers: Any) -> None:
    try:
        conn.execute("SELECT dispatch.send_request(%s, %s, stop_codes => %s, headers => %s)",
                     (method, uri, stop_codes, Jsonb(headers)))
    except psycopg.Error as exc:
        assert "dispatch.send_request:" in str(exc) or "unsupported Unicode escape" in str(exc), str(exc)


garbage_args = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@pytest.mark.chaos
@settings(max_examples=3)
@given(rows=st.lists(garbage_args, min_size=30, max_size=30))
def test_garbage_rows_never_stop_a_worker_and_valid_jobs_still_run(db_url: str, rows: list[dict[str, Any]]) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'debug.noop' FROM generate_series(1, 50)")
    with psycopg.connect(db_url, autocommit=True) as c:
        for args in rows:
            for kind in ("debug.sleep", "debug.fail"):
                try:
                    c.execute("INSERT INTO dispatch.jobs (kind, args, max_attempts) VALUES (%s, %s, 1)",
                              (kind, Jsonb(args)))
                except psycopg.Error as exc:  # NUL inside JSON text: PostgreSQL refuses it
                    assert "unsupported Unicode escape" in str(exc) or "\\u0000" in str(exc), str(exc)
    # Keep the run short: valid sleeps sleep 0 s.
    execute(db_url, "UPDATE dispatch.jobs SET args = jsonb_set(args, '{seconds}', '0') "
                    "WHERE kind = 'debug.sleep' AND jsonb_typeof(args->'seconds') = 'number'")
    runner = Runner(WorkerConfig(database_url=db_url, drain=True), DEBUG)
    assert asyncio.run(asyncio.wait_for(runner.run(), 60)) == 0
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    assert runner.counters.completed >= 50
    assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs WHERE reason NOT IN ('invalid', 'exhausted')") == 0
