"""Processes: list, show, restart, work, abandon (the seed's process-manager commands)."""

from __future__ import annotations

import argparse
from typing import Any

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, Env, connect, emit, fields, positive_int, say, table
from pgdispatch.db.errors import NotFound, translated

STATUSES = ("pending", "running", "retry", "error", "done", "abandoned")


def register(sub: Any) -> None:
    p = sub.add_parser("process", help="processes: list, show, restart, work, abandon")
    psub = p.add_subparsers(dest="process_command", required=True, metavar="COMMAND")
    pl = psub.add_parser("list", help="the newest instances")
    pl.add_argument("--status", choices=STATUSES, help="only this status")
    pl.add_argument("--type", help="only this process type")
    pl.add_argument("--limit", type=positive_int, default=50, help="how many")
    pl.add_argument("--json", action="store_true")
    ps = psub.add_parser("show", help="the instance, its state and its journal (payloads masked)")
    ps.add_argument("id", type=int, help="the process")
    ps.add_argument("--json", action="store_true")
    pr = psub.add_parser("restart", help="from error or retry (the seed's restart-process)")
    pr.add_argument("id", type=int, help="the process")
    pr.add_argument("--from-step", metavar="NAME", help="start again at this step (default: where it stands)")
    pr.add_argument("--reason", help="kept in its journal and the audit log")
    pw = psub.add_parser("work", help="run its current step now (the seed's process-manager:work)")
    pw.add_argument("id", type=int, help="the process")
    pa = psub.add_parser("abandon", help="never run it again")
    pa.add_argument("id", type=int, help="the process")
    pa.add_argument("--reason", required=True, help="why (kept in its journal and the audit log)")
    p.set_defaults(func=processes)


def processes(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        action = args.process_command
        if action == "list":
            rows = conn.execute(sql.query("process_list"), {
                "status": args.status, "type": args.type, "limit": args.limit}).fetchall()
            emit(args, rows, lambda r: table(r, ["id", "type", "version", "status", "current_step",
                                                 "attempts", "retry_after", "error", "updated_at"],
                                             title="processes"))
            return EXIT_OK
        row = conn.execute(sql.query("process_get"), {"id": args.id}).fetchone()
        if row is None:
            raise NotFound(f"no process {args.id}")
        if action == "show":
            journal = conn.execute(sql.query("process_journal"), {"id": args.id}).fetchall()

            def render(d: dict[str, Any]) -> None:
                fields(d, skip=("journal",))
                say("")
                table(d["journal"], ["step", "attempt", "status", "message", "payload", "error", "version",
                                     "finished_at"], title="journal")

            emit(args, {**row, "journal": journal}, render)
            return EXIT_OK
        if action == "restart":
            conn.execute(sql.query("process_restart"), {"id": args.id, "from_step": args.from_step,
                                                        "who": env.operator, "reason": args.reason})
            say(f"process {args.id} restarted at step {args.from_step or row['current_step']}")
        elif action == "work":
            conn.execute(sql.query("process_work"), {"id": args.id, "who": env.operator})
            say(f"process {args.id}: step {row['current_step']} queued to run now")
        else:
            conn.execute(sql.query("process_abandon"), {"id": args.id, "who": env.operator,
                                                        "reason": args.reason})
            say(f"process {args.id} abandoned")
    return EXIT_OK
