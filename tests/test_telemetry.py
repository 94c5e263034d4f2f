"""Telemetry (issue 22): a JSON log line per finished job, OpenTelemetry spans per attempt joined
to the producer's trace, and metrics with no label that changes at a restart (tests/test_pool.py
scrapes a real pool's /metrics)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgdispatch
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.runner import Runner
from pgdispatch.worker.telemetry import configure_logging
from tests.helpers import scalar

ROOT = Path(__file__).resolve().parent.parent


def test_json_logs_have_a_line_per_finished_job(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.jobs (kind) VALUES ('debug.noop'), ('debug.fail')")
        conn.execute("UPDATE dispatch.queues SET max_attempts = 1")
    env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "DEBUG", "PGDISPATCH_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "worker", "--drain", "--debug-kinds"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    finished = {line["kind"]: line for line in lines if "job_id" in line}
    assert set(finished) == {"debug.noop", "debug.fail"}
    assert finished["debug.noop"]["outcome"] == "completed" and finished["debug.fail"]["outcome"] == "dead"
    assert finished["debug.noop"]["level"] == "debug" and finished["debug.noop"]["seconds"] >= 0
    assert {"ts", "logger", "pid", "message", "queue", "attempt"} <= set(finished["debug.noop"])
    env["PGDISPATCH_LOG_FORMAT"] = "yaml"
    wrong = subprocess.run([sys.executable, str(ROOT / "cli.py"), "status"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert wrong.returncode == 2 and "PGDISPATCH_LOG_FORMAT='yaml': text or json" in wrong.stderr


async def test_an_attempts_span_joins_the_producers_trace(db_url: str) -> None:
    trace = pytest.importorskip("opentelemetry.trace")
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    from pgdispatch.worker import telemetry

    previous = telemetry._TRACER
    telemetry._TRACER = provider.get_tracer("pgdispatch")
    try:
        with tracer.start_as_current_span("POST /orders") as producer, psycopg.connect(db_url) as conn:
            job_id = pgdispatch.enqueue(conn, "order.notify", {"order": 7})
            conn.commit()
        assert scalar(db_url, "SELECT args ? '_traceparent' FROM dispatch.jobs WHERE id = %s", (job_id,))

        async def notify(job: pgdispatch.Job) -> pgdispatch.Outcome:
            raise RuntimeError("the mail server said no")

        runner = Runner(WorkerConfig(database_url=db_url, drain=True), {"order.notify": notify})
        execute_once = scalar(db_url, "UPDATE dispatch.jobs SET max_attempts = 1 RETURNING id")
        assert execute_once == job_id
        await runner.run()
    finally:
        telemetry._TRACER = previous
    spans = [s for s in exporter.get_finished_spans() if s.name == "order.notify process"]
    assert len(spans) == 1
    span: Any = spans[0]
    assert span.context.trace_id == producer.get_span_context().trace_id
    assert span.parent.span_id == producer.get_span_context().span_id
    assert span.attributes["pgdispatch.outcome"] == "dead" and span.attributes["messaging.destination.name"] == "default"
    assert span.kind == trace.SpanKind.CONSUMER and span.status.status_code == trace.StatusCode.ERROR


def test_a_cli_run_inside_a_program_keeps_its_handlers_and_leaves_none_on_a_closed_stream(
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: configure_logging (run by every `pgdispatch` command, in-process in the tests)
    # replaced the root's handlers with one bound to the sys.stderr of that moment; once that
    # stream closed, each later line printed "--- Logging error ---" with the raw exception
    # being handled (a URL's key included: test_secrets caught one), and the program's own
    # handlers (here pytest's) were gone.
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        with contextlib.redirect_stderr(stream):
            configure_logging(logging.INFO)
            configure_logging(logging.INFO)  # a second command: still one handler of ours
        stream.close()
        def ours(handlers: list[logging.Handler]) -> list[logging.Handler]:
            return [h for h in handlers if type(h).__module__ == configure_logging.__module__]

        assert len(ours(root.handlers)) == 1  # an earlier command's is replaced, the others stay
        assert set(before[0]) - set(ours(before[0])) <= set(root.handlers)
        logging.getLogger("pgdispatch.test").warning("after the command")
        assert "Logging error" not in capsys.readouterr().err
        assert [r.getMessage() for r in caplog.records] == ["after the command"]
    finally:
        root.handlers[:], _ = before
        root.setLevel(before[1])
