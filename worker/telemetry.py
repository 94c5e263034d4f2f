"""What a worker process tells the outside about its attempts: Prometheus metrics, a log line
per finished job, and (with the `otel` extra installed) an OpenTelemetry span per attempt.

Metrics are per process and summed by the pool: the pool points every child at one directory
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR) and serves their sum on
/metrics, so a child that restarts loses nothing. Outside a pool (tests, `app.drain`) they count
in this process's default registry.

A producer that runs under a span passes its trace context in the job's args (`_traceparent`,
the W3C header, added by `pgdispatch.enqueue`); the attempt's span is its child, so one trace
shows the request that enqueued the job and every attempt that ran it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram

from pgdispatch.db.producer import TRACEPARENT
from pgdispatch.worker.job import Job

log = logging.getLogger("pgdispatch.worker.jobs")

# Seconds; from a no-op's few milliseconds to a slow export's minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

ATTEMPTS = Counter("pgdispatch_attempts", "Attempts run by this pool's workers, by how they settled",
                   ["queue", "kind", "outcome"])
DURATION = Histogram("pgdispatch_job_duration_seconds",
                     "How long attempts took in this pool's workers (executor time)", ["queue", "kind"],
                     buckets=BUCKETS)

try:  # optional: pip install 'pgdispatch[otel]'
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _TRACER: Any = otel_trace.get_tracer("pgdispatch")
    _PROPAGATOR: Any = TraceContextTextMapPropagator()
    _NO_PROVIDERS: tuple[type, ...] = (otel_trace.ProxyTracerProvider, otel_trace.NoOpTracerProvider)
except ImportError:  # pragma: no cover - depends on the extra
    _TRACER = None


# The labelled series, looked up once each: labels() hashes and locks on every call, which was
# a few percent of a no-op job's CPU.
_attempts: dict[tuple[str, str, str], Any] = {}
_durations: dict[tuple[str, str], Any] = {}


def observe(job: Job, settled: str, seconds: float) -> None:
    """An attempt ended: count it, time it, and say so at DEBUG."""
    key = (job.queue, job.kind)
    counted = _attempts.get((*key, settled))
    if counted is None:
        counted = _attempts[(*key, settled)] = ATTEMPTS.labels(*key, settled)
    timed = _durations.get(key)
    if timed is None:
        timed = _durations[key] = DURATION.labels(*key)
    counted.inc()
    timed.observe(seconds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("job %s (%s) attempt %d %s in %.3fs", job.id, job.kind, job.attempt, settled, seconds,
                  extra={"job_id": job.id, "kind": job.kind, "queue": job.queue, "attempt": job.attempt,
                         "outcome": settled, "seconds": round(seconds, 6)})


_NO_SPAN: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


def span(job: Job) -> contextlib.AbstractContextManager[Any]:
    """An OpenTelemetry span around one attempt, the child of the producer's span when the job
    carries its trace context. Nothing without the extra, and nothing while no SDK has set a
    tracer provider: the API's own no-op spans cost a tenth of a no-op job."""
    if _TRACER is None or isinstance(_TRACER, otel_trace.NoOpTracer) or (
            isinstance(_TRACER, otel_trace.ProxyTracer)
            and isinstance(otel_trace.get_tracer_provider(), _NO_PROVIDERS)):
        return _NO_SPAN
    return _span(job)


@contextlib.contextmanager
def _span(job: Job) -> Iterator[Any]:
    carrier = job.args.get(TRACEPARENT) if isinstance(job.args, dict) else None
    parent = _PROPAGATOR.extract({"traceparent": carrier}) if isinstance(carrier, str) else None
    attributes = {"messaging.system": "pgdispatch", "messaging.destination.name": job.queue,
                  "pgdispatch.kind": job.kind, "pgdispatch.job_id": job.id, "pgdispatch.attempt": job.attempt}
    with _TRACER.start_as_current_span(f"{job.kind} process", context=parent,
                                       kind=otel_trace.SpanKind.CONSUMER, attributes=attributes) as current:
        yield current


def settle_span(current: Any, settled: str, error: str | None) -> None:
    if current is None:
        return
    current.set_attribute("pgdispatch.outcome", settled)
    if settled in ("retry", "dead") and error:
        current.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, error[:500]))


class JsonFormatter(logging.Formatter):
    """PGDISPATCH_LOG_FORMAT=json: one JSON object per line, for log shippers; the job fields of
    a finished job's line as fields of their own."""

    FIELDS = ("job_id", "kind", "queue", "attempt", "outcome", "seconds")

    def format(self, record: logging.LogRecord) -> str:
        at = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        entry: dict[str, Any] = {"ts": at, "level": record.levelname.lower(), "logger": record.name,
                                 "pid": record.process, "message": record.getMessage()}
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is written, not when the handler was made:
    a CLI run inside another program (a test, a notebook) leaves no handler behind that writes
    to a stream since closed (whose "Logging error" report would print the raw exception)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: int, fmt: str = "text") -> None:
    """The process's logging, the same in the CLI, the pool and every child: text or json.
    Replaces only the handler an earlier call installed; other handlers stay."""
    handler = _StderrHandler()
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level)
