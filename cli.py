"""pgdispatch command line: maintenance and the worker entry point.

Environment (read here and nowhere else):
  DATABASE_URL      the PostgreSQL to use; unset: an embedded server under $PGDISPATCH_HOME
  PGDISPATCH_HOME   where the embedded server keeps its data (default ./.pgdispatch)
  PGDISPATCH_BUILD  this code's build number (version guard), default 0
  PGDISPATCH_LOG    log level (default INFO)

Exit codes: 0 ok, 1 error, 2 bad usage or input, 3 not found, 4 database unavailable,
10 worker saw jobs of a newer build (--exit-on-newer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

import sql
from bench.report import SCENARIOS as BENCH_SCENARIOS
from db.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    PgDispatchError,
    translated,
)
from db.schema import migrate
from db.server import resolve_database_url, stop_embedded

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NO_DATABASE = 0, 1, 2, 3, 4

log = logging.getLogger("pgdispatch")


@dataclass(frozen=True)
class Env:
    database_url: str | None
    home: Path
    build: int
    log_level: int

    @classmethod
    def read(cls) -> Env:
        build = os.environ.get("PGDISPATCH_BUILD", "0")
        if not build.isdigit():
            raise ConfigurationError(f"PGDISPATCH_BUILD must be a non-negative integer, got {build!r}")
        level = os.environ.get("PGDISPATCH_LOG", "INFO").upper()
        return cls(database_url=os.environ.get("DATABASE_URL") or None,
                   home=Path(os.environ.get("PGDISPATCH_HOME", ".pgdispatch")),
                   build=int(build), log_level=getattr(logging, level, logging.INFO))

    def url(self) -> str:
        return resolve_database_url(self.database_url, self.home)


# -- helpers ------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(text: str) -> float:
    """'90', '90s', '5m', '2h', '7d', '250ms' → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 5m, 2h, 7d)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--args is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--args must be a JSON object, got {type(value).__name__}")
    return value


def connect(env: Env) -> psycopg.Connection[dict[str, Any]]:
    with translated():
        return psycopg.connect(env.url(), autocommit=True, row_factory=dict_row, connect_timeout=10)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, default=_json_default, indent=2))
    else:
        print(render(data))


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


# -- commands -----------------------------------------------------------------------------------

def cmd_migrate(env: Env, args: argparse.Namespace) -> int:
    url = env.url()
    migrate(url)
    print(f"schema is up to date ({_where(env)})")
    return EXIT_OK


def _where(env: Env) -> str:
    return "DATABASE_URL" if env.database_url else f"embedded PostgreSQL: {env.url()}"


def cmd_worker(env: Env, args: argparse.Namespace) -> int:
    from worker.config import WorkerConfig
    from worker.pool import WorkerPool
    from worker.process import run_event_loop

    url = env.url()
    if not env.database_url:
        print(f"using embedded PostgreSQL: psql '{url}'", file=sys.stderr)
    if args.migrate:
        migrate(url)
    config = WorkerConfig(
        database_url=url, queues=tuple(args.queue or ()), concurrency=args.concurrency,
        max_batch=args.batch, version=env.build, lease_seconds=args.lease,
        poll_interval=args.poll_interval, grace_seconds=args.grace, drain=args.drain,
        exit_on_newer=args.exit_on_newer, memory_limit_mb=args.memory_limit,
        rescue_interval=args.rescue_interval, per_host_limit=args.per_host_limit,
        breaker_failures=args.breaker_failures, breaker_cooldown=args.breaker_cooldown,
        fetch_cooldown=args.fetch_cooldown, debug_kinds=args.debug_kinds,
        allow_private_networks=(args.allow_private_networks if args.allow_private_networks is not None
                                else not env.database_url))
    pool = WorkerPool(config, processes=args.processes, time_limit=args.time_limit,
                      http_port=args.http_port, log_level=env.log_level)
    return run_event_loop(pool.run())


def cmd_status(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn:
        queues = conn.execute(sql.query("queue_stats")).fetchall()
        workers = conn.execute(sql.query("worker_status")).fetchall()
    data = {"queues": queues, "workers": workers}

    def render(d: dict[str, Any]) -> str:
        alive = [w for w in d["workers"] if w["status"] != "stopped"]
        return ("queues\n" + table(d["queues"], ["queue", "paused", "available", "scheduled",
                                                   "running", "dead", "oldest_wait_seconds"])
                + "\n\nworkers\n" + table(alive, ["id", "status", "version", "running",
                                                    "completed", "retried", "dead", "heartbeat_at"]))
    emit(args, data, render)
    return EXIT_OK


def cmd_enqueue(env: Env, args: argparse.Namespace) -> int:
    params = {
        "kind": args.kind, "args": Jsonb(args.args), "queue": args.queue,
        "priority": args.priority, "run_at": None, "expire_at": None,
        "max_attempts": args.max_attempts, "idempotency_key": args.idempotency_key,
        "tenant": args.tenant,
    }
    with connect(env) as conn, translated():
        if args.run_in is not None:
            params["run_at"] = _db_now_plus(conn, args.run_in)
        if args.expire_in is not None:
            params["expire_at"] = _db_now_plus(conn, args.expire_in)
        row = conn.execute(sql.query("enqueue"), params).fetchone()
    job_id = row["enqueue"] if row else None
    emit(args, {"id": job_id}, lambda d: f"enqueued job {d['id']}")
    return EXIT_OK


def _db_now_plus(conn: psycopg.Connection[dict[str, Any]], seconds: float) -> datetime:
    row = conn.execute("SELECT now() + make_interval(secs => %s) AS t", (seconds,)).fetchone()
    assert row is not None
    return row["t"]  # type: ignore[no-any-return]


def cmd_dead(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.dead_command == "list":
            rows = conn.execute(sql.query("dead_list"),
                                {"queue": args.queue, "limit": args.limit}).fetchall()
            emit(args, rows, lambda r: table(r, ["job_id", "queue", "kind", "reason", "attempt",
                                                 "last_status", "last_error", "died_at"]))
        elif args.dead_command == "show":
            row = conn.execute(sql.query("dead_show"), {"job_id": args.id}).fetchone()
            if row is None:
                raise NotFound(f"no dead job with id {args.id}")
            row["history"] = conn.execute(sql.query("dead_history"), {"job_id": args.id}).fetchall()
            emit(args, row, _render_dead_job)
        elif args.dead_command == "retry":
            if args.all == bool(args.ids):
                raise InvalidInput("give job ids or --all (not both)")
            expire_at = None if args.expire_in is None else _db_now_plus(conn, args.expire_in)
            if args.all:
                rows = conn.execute(sql.query("dead_retry_all"),
                                    {"queue": args.queue, "expire_at": expire_at}).fetchall()
            else:
                rows = conn.execute(sql.query("dead_retry"),
                                    {"job_ids": args.ids, "expire_at": expire_at}).fetchall()
            revived = [r["job_id"] for r in rows if r["job_id"] is not None]
            missing = sorted(set(args.ids or []) - set(revived))
            emit(args, {"retried": revived, "not_found": missing},
                 lambda d: f"{len(d['retried'])} dead jobs back in the queue"
                 + (f"; not found: {', '.join(map(str, d['not_found']))}" if d["not_found"] else ""))
            if missing:
                return EXIT_NOT_FOUND
        elif args.dead_command == "purge":
            if not args.yes:
                raise InvalidInput("purge deletes dead jobs for good: add --yes to confirm")
            cur = conn.execute(sql.query("dead_purge"), {
                "queue": args.queue, "older_than_seconds": args.older_than})
            emit(args, {"purged": cur.rowcount}, lambda d: f"purged {d['purged']} dead jobs")
    return EXIT_OK


def _render_dead_job(row: dict[str, Any]) -> str:
    lines = [f"{k}: {json.dumps(v) if k == 'args' else _cell(v)}"
             for k, v in row.items() if k != "history"]
    lines.append("history:")
    lines.append(table(row["history"], ["attempt", "outcome", "status", "error", "finished_at"]))
    return "\n".join(lines)


_QUEUE_SETTINGS: dict[str, Callable[[str], Any]] = {
    "max_attempts": int, "backoff_base": duration, "backoff_factor": float, "backoff_cap": duration,
    "backoff_jitter": float, "job_timeout": duration, "concurrency": int, "dedupe_window": duration,
}


def cmd_queues(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.queues_command == "list":
            rows = conn.execute(sql.query("load_queues")).fetchall()
            emit(args, rows, lambda r: table(r, ["name", "paused", "max_attempts", "backoff_base",
                                                 "backoff_factor", "backoff_cap", "job_timeout",
                                                 "concurrency", "dedupe_window"]))
            return EXIT_OK
        if args.queues_command == "create":
            conn.execute(sql.query("queue_create"), {"name": args.name})
            print(f"queue {args.name} exists")
            return EXIT_OK
        _require_queue(conn, args.name)
        if args.queues_command in ("pause", "resume"):
            conn.execute(sql.query("queue_set_paused"),
                         {"name": args.name, "paused": args.queues_command == "pause"})
            print(f"queue {args.name} {args.queues_command}d")
        elif args.queues_command == "set":
            values = {k: getattr(args, k) for k in _QUEUE_SETTINGS}
            if all(v is None for v in values.values()):
                raise InvalidInput("queues set: give at least one setting to change")
            conn.execute(sql.query("queue_update"), {"name": args.name, **values})
            print(f"queue {args.name} updated")
    return EXIT_OK


def _require_queue(conn: psycopg.Connection[dict[str, Any]], name: str) -> None:
    row = conn.execute(sql.query("queue_exists"), {"name": name}).fetchone()
    if not row or not row["exists"]:
        raise NotFound(f"no queue named {name!r} (create it: cli.py queues create {name})")


def cmd_request(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.request_command == "send":
            headers = dict(_header(h) for h in args.header or [])
            row = conn.execute(sql.query("send_request"), {
                "method": args.method, "uri": args.uri, "body": args.body,
                "expire_in": args.expire_in, "success_code": args.success_code,
                "stop_codes": args.stop_code or [], "attempt_limit": args.limit,
                "attempt_interval": args.interval, "http_timeout": args.timeout,
                "queue": args.queue, "idempotency_key": args.idempotency_key,
                "tenant": args.tenant, "headers": Jsonb(headers) if headers else None,
            }).fetchone()
            emit(args, {"id": row["send_request"] if row else None},
                 lambda d: f"request queued as job {d['id']}")
            return EXIT_OK
        job = conn.execute(sql.query("request_show"), {"job_id": args.id}).fetchone()
        if job is None:
            raise NotFound(f"no request with id {args.id}")
        job["attempts"] = conn.execute(sql.query("request_attempts"), {"job_id": args.id}).fetchall()
        emit(args, job, _render_request)
    return EXIT_OK


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise InvalidInput(f"--header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _render_request(job: dict[str, Any]) -> str:
    lines = [f"{k}: {json.dumps(v) if k == 'args' else _cell(v)}"
             for k, v in job.items() if k != "attempts"]
    lines.append("attempts:")
    lines.append(table(job["attempts"], ["attempt", "outcome", "status", "duration_ms",
                                         "error_message", "started_at"]))
    return "\n".join(lines)


def cmd_bench(env: Env, args: argparse.Namespace) -> int:
    import platform

    from bench import report

    url = env.url()
    try:
        peers = report.expand_peers(args.vs.split(",")) if args.vs is not None else report.installed_peers()
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    missing = sorted(set(peers) - set(report.installed_peers()))
    if missing:
        raise ConfigurationError(f"peer not installed: {', '.join(missing)}; run pip install -e '.[bench]'")
    with psycopg.connect(url) as conn:
        server = conn.execute("SHOW server_version").fetchone()
    machine = {"cores": os.cpu_count(), "postgresql": server[0] if server else "?",
               "python": platform.python_version(), "peers": peers, "rounds": args.rounds}
    if not args.json:
        print(f"# machine: {json.dumps(machine)}", flush=True)

    def emit(result: dict[str, Any]) -> None:
        if not args.json:
            print(json.dumps(result), flush=True)

    results = report.run(url, chosen=args.scenario or list(report.SCENARIOS), peers=peers, rounds=args.rounds,
                         jobs=args.jobs, requests=args.requests, emit=emit)
    rows = report.reduce(results)
    checks = report.targets(rows)
    if args.json:
        print(json.dumps({"machine": machine, "results": results, "summary": rows,
                          "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]},
                         indent=2))
    else:
        print()
        print(report.markdown(rows))
        print()
        print(report.targets_markdown(checks))
    return EXIT_OK


def cmd_embedded(env: Env, args: argparse.Namespace) -> int:
    if args.embedded_command == "url":
        print(env.url() if not env.database_url else env.database_url)
    elif args.embedded_command == "stop":
        stopped = stop_embedded(env.home)
        print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgdispatch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="apply pending migrations (idempotent)").set_defaults(func=cmd_migrate)

    w = sub.add_parser("worker", help="run the worker pool")
    w.add_argument("--queue", action="append",
                   help="queue to work (repeatable; default: every queue, including new ones)")
    w.add_argument("--processes", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--concurrency", type=int, default=100, help="job slots per process (default 100)")
    w.add_argument("--batch", type=int, default=100, help="most jobs per claim (default 100)")
    w.add_argument("--drain", action="store_true", help="run what is runnable now, then exit")
    w.add_argument("--time-limit", type=duration, default=0, help="stop after this long (e.g. 1h)")
    w.add_argument("--memory-limit", type=int, default=0,
                   help="restart a process whose RSS exceeds this many MiB")
    w.add_argument("--http-port", type=int, help="serve /health /stats /metrics on this port")
    w.add_argument("--lease", type=duration, default=30.0, help="lease length (default 30s)")
    w.add_argument("--poll-interval", type=duration, default=1.0, help="poll when idle (default 1s)")
    w.add_argument("--rescue-interval", type=duration, default=5.0,
                   help="sweep expired leases this often (default 5s)")
    w.add_argument("--grace", type=duration, default=25.0,
                   help="on SIGTERM, wait this long for running jobs (default 25s)")
    w.add_argument("--exit-on-newer", action="store_true",
                   help="exit with code 10 when jobs of a newer build wait")
    w.add_argument("--per-host-limit", type=int, default=64,
                   help="HTTP requests in flight to one host per process (default 64)")
    w.add_argument("--breaker-failures", type=int, default=5,
                   help="consecutive failures that open a (tenant, host) circuit (default 5)")
    w.add_argument("--breaker-cooldown", type=duration, default=30.0,
                   help="how long an open circuit sends nothing before one probe (default 30s)")
    private = w.add_mutually_exclusive_group()
    private.add_argument("--allow-private-networks", dest="allow_private_networks",
                         action="store_true", default=None,
                         help="let requests reach loopback/private/link-local addresses "
                              "(default only with the embedded server)")
    private.add_argument("--forbid-private-networks", dest="allow_private_networks",
                         action="store_false", help="refuse them (default with DATABASE_URL)")
    w.add_argument("--fetch-cooldown", type=duration, default=0.01,
                   help="claim at most once per this long on NOTIFY bursts (default 10ms)")
    w.add_argument("--debug-kinds", action="store_true",
                   help="also run the debug.* kinds (tests and benchmarks)")
    w.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("status", help="queues and workers at a glance")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("enqueue", help="enqueue one job")
    e.add_argument("kind")
    e.add_argument("--args", type=json_object, default={}, help="JSON object (default {})")
    e.add_argument("--queue", default="default")
    e.add_argument("--priority", type=int, default=0, help="-100..100, lower runs first")
    e.add_argument("--run-in", type=duration, help="schedule for later (e.g. 10m)")
    e.add_argument("--expire-in", type=duration, help="never run after this long (e.g. 1d)")
    e.add_argument("--max-attempts", type=int)
    e.add_argument("--idempotency-key")
    e.add_argument("--tenant")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_enqueue)

    d = sub.add_parser("dead", help="dead letters: list, show, retry, purge")
    dsub = d.add_subparsers(dest="dead_command", required=True)
    dl = dsub.add_parser("list")
    dl.add_argument("--queue")
    dl.add_argument("--limit", type=int, default=50)
    dl.add_argument("--json", action="store_true")
    ds = dsub.add_parser("show")
    ds.add_argument("id", type=int)
    ds.add_argument("--json", action="store_true")
    dr = dsub.add_parser("retry")
    dr.add_argument("ids", type=int, nargs="*")
    dr.add_argument("--all", action="store_true")
    dr.add_argument("--queue", help="with --all: only this queue")
    dr.add_argument("--expire-in", type=duration,
                    help="a new expiry (e.g. 1d): required to revive jobs that died 'expired'")
    dr.add_argument("--json", action="store_true")
    dp = dsub.add_parser("purge")
    dp.add_argument("--queue")
    dp.add_argument("--older-than", type=duration, help="only those dead for longer (e.g. 7d)")
    dp.add_argument("--yes", action="store_true", help="confirm")
    dp.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_dead)

    q = sub.add_parser("queues", help="queue policies: list, create, pause, resume, set")
    qsub = q.add_subparsers(dest="queues_command", required=True)
    ql = qsub.add_parser("list")
    ql.add_argument("--json", action="store_true")
    for name in ("create", "pause", "resume"):
        qsub.add_parser(name).add_argument("name")
    qs = qsub.add_parser("set")
    qs.add_argument("name")
    for setting, kind in _QUEUE_SETTINGS.items():
        qs.add_argument("--" + setting.replace("_", "-"), dest=setting, type=kind,
                        help="0 removes the cap" if setting == "concurrency" else None)
    q.set_defaults(func=cmd_queues)

    r = sub.add_parser("request", help="outbound HTTP requests: send, show")
    rsub = r.add_subparsers(dest="request_command", required=True)
    rs = rsub.add_parser("send", help="queue one request (dispatch.send_request)")
    rs.add_argument("--method", required=True, help="GET, POST, PUT, PATCH or DELETE")
    rs.add_argument("--uri", required=True)
    rs.add_argument("--body", help="the request field of the JSON sent (e.g. a JWT)")
    rs.add_argument("--success-code", type=int, default=200)
    rs.add_argument("--stop-code", type=int, action="append", help="repeatable; 418 always stops")
    rs.add_argument("--expire-in", type=duration, help="give up after this long (e.g. 1d)")
    rs.add_argument("--interval", type=int, default=60, help="seconds between attempts (default 60)")
    rs.add_argument("--limit", type=int, help="attempts (default: derived from expiry, else 1440)")
    rs.add_argument("--timeout", type=int, default=30, help="HTTP timeout in seconds (default 30)")
    rs.add_argument("--header", action="append", help="'Name: value', repeatable")
    rs.add_argument("--queue", default="requests")
    rs.add_argument("--idempotency-key")
    rs.add_argument("--tenant")
    rs.add_argument("--json", action="store_true")
    rw = rsub.add_parser("show", help="a request, its state and every attempt")
    rw.add_argument("id", type=int)
    rw.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_request)

    b = sub.add_parser("bench", help="measure pgdispatch beside its peers, on fresh databases")
    b.add_argument("--scenario", action="append", choices=list(BENCH_SCENARIOS),
                   help="repeatable (default: all)")
    b.add_argument("--vs", help="comma-separated peers: pgqueuer, pgqueuer-psycopg, pgqueuer-asyncpg, "
                                "procrastinate, none (default: every installed peer)")
    b.add_argument("--jobs", type=int, default=50_000, help="drain: no-op jobs (default 50,000)")
    b.add_argument("--requests", type=int, default=20_000, help="deliver: requests (default 20,000)")
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("embedded", help="the embedded PostgreSQL: url, stop")
    m.add_argument("embedded_command", choices=["url", "stop"])
    m.set_defaults(func=cmd_embedded)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        env = Env.read()
        logging.basicConfig(level=env.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return int(args.func(env, args))
    except DatabaseUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATABASE
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (InvalidInput, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PgDispatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
