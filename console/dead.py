"""Dead letters: list, show, retry, purge."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PARTLY,
    Conn,
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

CHUNK = 5000  # dead letters per transaction of a bulk retry or purge


def register(sub: Any) -> None:
    d = sub.add_parser("dead", help="dead letters: list, show, retry, purge")
    dsub = d.add_subparsers(dest="dead_command", required=True, metavar="COMMAND")
    dl = dsub.add_parser("list", help="the newest dead letters")
    dl.add_argument("--queue", help="only this queue")
    dl.add_argument("--limit", type=int, default=50, help="how many")
    dl.add_argument("--json", action="store_true")
    ds = dsub.add_parser("show", help="one dead letter: its masked args and every attempt")
    ds.add_argument("id", type=int, help="the job id")
    ds.add_argument("--json", action="store_true")
    dr = dsub.add_parser("retry", help="back into their queues; each one skipped is named with why (exit 5)")
    dr.add_argument("ids", type=int, nargs="*", help="job ids (or --all)")
    dr.add_argument("--all", action="store_true", help="every dead letter (with --queue: of that queue)")
    dr.add_argument("--queue", help="with --all: only this queue")
    dr.add_argument("--expire-in", type=duration,
                    help="a new expiry (e.g. 1d): required to revive jobs that died 'expired'")
    dr.add_argument("--json", action="store_true")
    dp = dsub.add_parser("purge", help="delete dead letters for good")
    dp.add_argument("--queue", help="only this queue")
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
            revived, skipped = [], []
            for chunk in _chunks(conn, args) if args.all else [args.ids]:
                for r in conn.execute(sql.query("dead_retry"), {"job_ids": chunk, "expire_at": expire_at,
                                                               "who": env.operator, "reason": None}):
                    if r["revived"]:
                        revived.append(r["job_id"])
                    else:
                        skipped.append({"job_id": r["job_id"], "reason": r["reason"]})
                conn.commit()  # each chunk is done for good, whatever happens to the next
            emit(args, {"retried": revived, "skipped": skipped}, _render_retry)
            if skipped:
                # Done as far as it could go: every skipped job is named with why.
                none_exist = not revived and all(s["reason"] == "not a dead job" for s in skipped)
                return EXIT_NOT_FOUND if none_exist else EXIT_PARTLY
        elif args.dead_command == "purge":
            if not args.yes:
                raise InvalidInput("purge deletes dead jobs for good: add --yes to confirm")
            purged = 0
            for chunk in _chunks(conn, args):
                purged += sum(1 for r in conn.execute(sql.query("dead_purge"), {
                    "job_ids": chunk, "who": env.operator, "reason": None}) if r["purged"])
                conn.commit()
            emit(args, {"purged": purged}, lambda d: say(f"purged {d['purged']} dead jobs"))
    return EXIT_OK


def _chunks(conn: Conn, args: argparse.Namespace) -> Iterator[list[int]]:
    """The ids of the dead letters the filter matches, CHUNK at a time, oldest death first (a
    chunk revived or purged leaves the filter, so the cursor only moves forward)."""
    after: tuple[Any, int] | None = None
    while True:
        rows = conn.execute(sql.query("dead_ids"), {
            "queue": args.queue, "kind": None, "reason": None, "since": None, "until": None,
            "older_than_seconds": getattr(args, "older_than", None), "limit": CHUNK,
            "after_at": after[0] if after else None, "after_id": after[1] if after else None}).fetchall()
        if not rows:
            return
        yield [r["job_id"] for r in rows]
        after = (rows[-1]["died_at"], rows[-1]["job_id"])


def _render_retry(done: dict[str, Any]) -> None:
    say(f"{len(done['retried'])} dead jobs back in the queue"
        + (f"; {len(done['skipped'])} skipped:" if done["skipped"] else ""))
    for skipped in done["skipped"]:
        say(f"  job {skipped['job_id']}: {skipped['reason']}")


def _render_dead_job(row: dict[str, Any]) -> None:
    fields(row, skip=("history",))
    say("history:")
    table(row["history"], ["attempt", "outcome", "status", "error", "finished_at"], full=("error",))
