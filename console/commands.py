"""Periodic commands: status, disable, enable, unlock, run, safe-to-stop (the seed's switches)."""

from __future__ import annotations

import argparse
from typing import Any

from pgdispatch import sql
from pgdispatch.console.common import EXIT_ERROR, EXIT_OK, PROG, Conn, Env, connect, emit, say, table
from pgdispatch.db.errors import InvalidInput, NotFound, translated

SAFE = ("Disabled", "Idle")


def register(sub: Any) -> None:
    p = sub.add_parser("commands", help="periodic commands: status, disable, enable, unlock, run")
    csub = p.add_subparsers(dest="commands_command", required=True, metavar="COMMAND")
    cs = csub.add_parser("status", help="Idle / Working / Queued / Disabled / Locked, last and next run")
    cs.add_argument("--json", action="store_true")
    for name, text in (("disable", "no new runs (a running one finishes)"), ("enable", "runs again")):
        c = csub.add_parser(name, help=text)
        c.add_argument("key", nargs="?", help="the command (or --all)")
        c.add_argument("--all", action="store_true", help="every command (the seed's all-commands switch)")
        c.add_argument("--reason", help="kept in dispatch.audit_log")
    u = csub.add_parser("unlock", help="give up a run whose worker died (its lock is stale)")
    u.add_argument("key", help="the command")
    u.add_argument("--reason", help="kept in dispatch.audit_log")
    r = csub.add_parser("run", help="run a command now (even when disabled; never beside its own run)")
    r.add_argument("key", help="the command")
    r.add_argument("--json", action="store_true")
    ss = csub.add_parser("safe-to-stop", help="exit 0 when every command is Disabled or Idle, else 1")
    ss.add_argument("--json", action="store_true")
    p.set_defaults(func=commands)


def commands(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        action = args.commands_command
        if action in ("status", "safe-to-stop"):
            return _status(conn, args, verdict_only=action == "safe-to-stop")
        if action in ("disable", "enable"):
            if bool(args.key) == bool(args.all):
                raise InvalidInput(f"commands {action}: give a command key or --all, not both")
            if args.key:
                _require(conn, args.key)
            conn.execute(sql.query("switch_command"), {"key": args.key, "enable": action == "enable",
                                                      "who": env.operator, "reason": args.reason})
            finishes = "; a running one finishes (see: pgdispatch commands status)"
            say(f"{'all commands' if args.all else 'command ' + args.key} {action}d"
                + (finishes if action == "disable" else ""))
            return EXIT_OK
        _require(conn, args.key)
        if action == "unlock":
            row = conn.execute(sql.query("unlock_command"), {"key": args.key, "who": env.operator,
                                                             "reason": args.reason}).fetchone()
            released = row["released"] if row else 0
            say(f"command {args.key}: {released} stale run given up" if released else
                f"command {args.key} has no stale lock (a lock is stale once its run's lease ran out)")
            return EXIT_OK
        row = conn.execute(sql.query("run_command"), {"key": args.key, "who": env.operator}).fetchone()
        job_id = row["job_id"] if row else None
        if job_id is None:
            say(f"command {args.key} not started: its previous run is still queued or running "
                f"(see: {PROG} commands status)")
            return EXIT_ERROR
        emit(args, {"key": args.key, "job_id": job_id},
             lambda d: say(f"command {d['key']} started: job {d['job_id']}"))
        return EXIT_OK


def _status(conn: Conn, args: argparse.Namespace, *, verdict_only: bool) -> int:
    rows = conn.execute(sql.query("command_status")).fetchall()
    busy = [r for r in rows if r["status"] not in SAFE]
    verdict = ("safe to stop: yes, every command is Disabled or Idle" if not busy else
               "safe to stop: no, " + ", ".join(f"{r['key']} is {r['status']}" for r in busy))

    def render(data: dict[str, Any]) -> None:
        if not verdict_only:
            table(data["commands"], ["key", "name", "schedule", "status", "holder", "since", "expires",
                                     "last_run", "last_outcome", "last_error", "next_run"], title="commands")
            say("")
        say(data["verdict"])

    emit(args, {"commands": rows, "safe_to_stop": not busy, "verdict": verdict}, render)
    return EXIT_ERROR if verdict_only and busy else EXIT_OK


def _require(conn: Conn, key: str) -> None:
    row = conn.execute(sql.query("command_exists"), {"key": key}).fetchone()
    if not row or not row["exists"]:
        raise NotFound(f"no command {key!r} (commands are registered by workers started with --app; "
                       f"see: {PROG} commands status)")
