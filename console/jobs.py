"""Jobs: enqueue one, and the status of queues and workers at a glance."""

from __future__ import annotations

import argparse
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PARTLY,
    PROG,
    Env,
    connect,
    db_now_plus,
    duration,
    emit,
    json_object,
    say,
    table,
    warn,
)
from pgdispatch.db.errors import translated


def register(sub: Any) -> None:
    s = sub.add_parser("status", help="queues and workers at a glance")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=status)

    e = sub.add_parser("enqueue", help="enqueue one job")
    e.add_argument("kind", help="what to run (an executor's kind, such as debug.noop)")
    e.add_argument("--args", type=json_object("--args"), default={}, help="JSON object (default {})")
    e.add_argument("--queue", default="default", help="the queue it waits in")
    e.add_argument("--priority", type=int, default=0, help="-100..100, lower runs first")
    e.add_argument("--run-in", type=duration, help="schedule for later (e.g. 10m)")
    e.add_argument("--expire-in", type=duration, help="never run after this long (e.g. 1d)")
    e.add_argument("--max-attempts", type=int, help="attempts before it is dead (default: the queue's)")
    e.add_argument("--idempotency-key", help="a second job with this key in this queue is not created")
    e.add_argument("--tenant", help="whose job it is (shared limits apply per tenant)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=enqueue)

    j = sub.add_parser("jobs", help="live jobs: cancel")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    c = jsub.add_parser("cancel", help="cancel queued or running jobs: each ends among the dead letters "
                                       "as 'cancelled'; its worker stops a running one within a second")
    c.add_argument("ids", type=int, nargs="+", help="job ids")
    c.add_argument("--reason", help="kept with the dead letter and in the audit log")
    c.add_argument("--json", action="store_true")
    j.set_defaults(func=jobs)


def status(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        queues = conn.execute(sql.query("queue_stats")).fetchall()
        workers = conn.execute(sql.query("worker_status")).fetchall()
        unserved = [r["queue"] for r in conn.execute(sql.query("queues_without_workers")).fetchall()]
        no_worker = conn.execute(sql.read("inspect/waiting_without_worker.sql").encode()).fetchall()
    data = {"queues": queues, "workers": workers, "queues_without_workers": unserved,
            "waiting_without_worker": no_worker}

    def render(d: dict[str, Any]) -> None:
        table(d["queues"], ["queue", "paused", "available", "scheduled", "running", "dead",
                            "oldest_wait_seconds"], title="queues")
        say("")
        alive = [w for w in d["workers"] if w["status"] != "stopped"]
        table(alive, ["id", "status", "queues", "version", "running", "completed", "retried", "dead",
                      "heartbeat_at"], title="workers")
        unserved = set(d["queues_without_workers"])
        for row in d["waiting_without_worker"]:
            jobs = f"{row['jobs']} {row['kind']} job(s) in queue {row['queue']!r}"
            if row["queue"] in unserved:
                warn(f"{jobs} wait and no live worker serves that queue "
                     f"(start one: {PROG} worker, or {PROG} worker --queue {row['queue']})")
            else:
                warn(f"{jobs} wait for a worker that runs that kind at build {row['version']} "
                     f"or newer (your own kinds: {PROG} worker --app module:app)")
    emit(args, data, render)
    return EXIT_OK


def enqueue(env: Env, args: argparse.Namespace) -> int:
    params = {
        "kind": args.kind, "args": Jsonb(args.args), "queue": args.queue,
        "priority": args.priority, "run_at": None, "expire_at": None,
        "max_attempts": args.max_attempts, "idempotency_key": args.idempotency_key,
        "tenant": args.tenant,
    }
    with connect(env) as conn, translated(), conn.transaction():
        if args.run_in is not None:
            params["run_at"] = db_now_plus(conn, args.run_in)
        if args.expire_in is not None:
            params["expire_at"] = db_now_plus(conn, args.expire_in)
        row = conn.execute(sql.query("enqueue"), params).fetchone()
        assert row is not None
        fresh = conn.execute(sql.query("created_by_this_transaction"), {"id": row["id"]}).fetchone()
    data = {"id": row["id"], "created": bool(fresh and fresh["created"])}
    emit(args, data, lambda d: say(f"enqueued job {d['id']}" if d["created"] else
                                   f"not enqueued: idempotency key {args.idempotency_key!r} is "
                                   f"already taken by job {d['id']}"))
    return EXIT_OK


def jobs(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        rows = conn.execute(sql.query("console_cancel_jobs"), {"ids": args.ids, "reason": args.reason,
                                                              "who": env.operator}).fetchall()
    done = [{"job_id": r["job_id"], "detail": r["detail"]} for r in rows if r["done"]]
    skipped = [{"job_id": r["job_id"], "reason": r["detail"]} for r in rows if not r["done"]]

    def render(d: dict[str, Any]) -> None:
        skipped_text = f"; {len(d['skipped'])} skipped:" if d["skipped"] else ""
        say(f"{len(d['cancelled'])} jobs cancelled{skipped_text}")
        for item in d["cancelled"]:
            say(f"  job {item['job_id']}: {item['detail']}")
        for item in d["skipped"]:
            say(f"  job {item['job_id']} skipped: {item['reason']}")

    emit(args, {"cancelled": done, "skipped": skipped}, render)
    if skipped:
        return EXIT_NOT_FOUND if not done else EXIT_PARTLY
    return EXIT_OK
