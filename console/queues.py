"""Queue policies: list, create, pause, resume, set."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, PROG, Conn, Env, connect, duration, emit, say, table
from pgdispatch.db.errors import InvalidInput, NotFound, translated

QUEUE_VERBS = {"create": "a new queue with the default policy",
               "pause": "claim nothing from it until resumed", "resume": "claim from it again"}
SETTINGS_HELP = {
    "max_attempts": "attempts before a job is dead", "backoff_base": "the first retry's wait (e.g. 1s)",
    "backoff_factor": "each retry waits this many times longer", "backoff_cap": "the longest wait (e.g. 1h)",
    "backoff_jitter": "a random share of the wait (0-1)",
    "job_timeout": "an attempt running longer is cancelled",
    "concurrency": "jobs of this queue running at once across all workers (0 removes the cap)",
    "dedupe_window": "how long a finished job's idempotency key is still kept",
}
SETTINGS: dict[str, Callable[[str], Any]] = {
    "max_attempts": int, "backoff_base": duration, "backoff_factor": float, "backoff_cap": duration,
    "backoff_jitter": float, "job_timeout": duration, "concurrency": int, "dedupe_window": duration,
}


def register(sub: Any) -> None:
    q = sub.add_parser("queues", help="queue policies: list, create, pause, resume, set")
    qsub = q.add_subparsers(dest="queues_command", required=True, metavar="COMMAND")
    ql = qsub.add_parser("list", help="every queue and its policy")
    ql.add_argument("--json", action="store_true")
    for name in ("create", "pause", "resume"):
        qsub.add_parser(name, help=QUEUE_VERBS[name]).add_argument("name", help="the queue")
    qs = qsub.add_parser("set", help="change a queue's policy (the settings given)")
    qs.add_argument("name", help="the queue")
    for setting, kind in SETTINGS.items():
        qs.add_argument("--" + setting.replace("_", "-"), dest=setting, type=kind,
                        help=SETTINGS_HELP[setting])
    q.set_defaults(func=queues)


def queues(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.queues_command == "list":
            rows = conn.execute(sql.query("load_queues")).fetchall()
            emit(args, rows, lambda r: table(r, ["name", "paused", "max_attempts", "backoff_base",
                                                 "backoff_factor", "backoff_cap", "job_timeout",
                                                 "concurrency", "dedupe_window"]))
            return EXIT_OK
        if args.queues_command == "create":
            cur = conn.execute(sql.query("queue_create"), {"name": args.name})
            say(f"queue {args.name} created" if cur.rowcount else f"queue {args.name} already exists")
            return EXIT_OK
        _require_queue(conn, args.name)
        if args.queues_command in ("pause", "resume"):
            conn.execute(sql.query("queue_set_paused"), {
                "name": args.name, "paused": args.queues_command == "pause", "who": env.operator,
                "reason": None})
            say(f"queue {args.name} {args.queues_command}d")
        elif args.queues_command == "set":
            changes = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
            if not changes:
                raise InvalidInput("queues set: give at least one setting to change")
            conn.execute(sql.query("queue_update"), {"name": args.name, "changes": Jsonb(changes),
                                                    "who": env.operator, "reason": None})
            say(f"queue {args.name} updated")
    return EXIT_OK


def _require_queue(conn: Conn, name: str) -> None:
    row = conn.execute(sql.query("queue_exists"), {"name": name}).fetchone()
    if not row or not row["exists"]:
        raise NotFound(f"no queue named {name!r} (create it: {PROG} queues create {name})")
