"""Dead letters: list, show, retry, purge."""

from __future__ import annotations

import argparse
from typing import Any

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PARTLY,
    Env,
    connect,
    db_now_plus,
    duration,
    emit,
    fields,
    say,
    table,
)
from pgdispatch.db.errors import InvalidInput, NotFound, translated


def register(sub: Any) -> None:
    d = sub.add_parser("dead", help="dead letters: list, show, retry, purge")
    dsub = d.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
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
    d.set_defaults(func=dead)


def dead(env: Env, args: argparse.Namespace) -> int:
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
            expire_at = None if args.expire_in is None else db_now_plus(conn, args.expire_in)
            if args.all:
                rows = conn.execute(sql.query("dead_retry_all"),
                                    {"queue": args.queue, "expire_at": expire_at}).fetchall()
            else:
                rows = conn.execute(sql.query("dead_retry"),
                                    {"job_ids": args.ids, "expire_at": expire_at}).fetchall()
            revived = [r["job_id"] for r in rows if r["revived"]]
            skipped = [{"job_id": r["job_id"], "reason": r["reason"]} for r in rows if not r["revived"]]
            emit(args, {"retried": revived, "skipped": skipped}, _render_retry)
            if skipped:
                # Done as far as it could go: every skipped job is named with why.
                none_exist = not revived and all(s["reason"] == "not a dead job" for s in skipped)
                return EXIT_NOT_FOUND if none_exist else EXIT_PARTLY
        elif args.dead_command == "purge":
            if not args.yes:
                raise InvalidInput("purge deletes dead jobs for good: add --yes to confirm")
            cur = conn.execute(sql.query("dead_purge"), {
                "queue": args.queue, "older_than_seconds": args.older_than})
            emit(args, {"purged": cur.rowcount}, lambda d: say(f"purged {d['purged']} dead jobs"))
    return EXIT_OK


def _render_retry(done: dict[str, Any]) -> None:
    say(f"{len(done['retried'])} dead jobs back in the queue"
        + (f"; {len(done['skipped'])} skipped:" if done["skipped"] else ""))
    for skipped in done["skipped"]:
        say(f"  job {skipped['job_id']}: {skipped['reason']}")


def _render_dead_job(row: dict[str, Any]) -> None:
    fields(row, skip=("history",))
    say("history:")
    table(row["history"], ["attempt", "outcome", "status", "error", "finished_at"], full=("error",))
