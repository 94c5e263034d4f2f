"""Shared limits: list, set, clear, reset (dispatch.limits, dispatch.limit_status)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, Env, connect, duration, emit, say, table
from pgdispatch.db.errors import InvalidInput, NotFound, translated

OFF = "off"


def _or_off(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return OFF if text == OFF else kind(text)
    parse.__name__ = kind.__name__
    return parse


SETTINGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "rate": (float, "requests per second across all workers"),
    "burst": (int, "bucket size (default: one second's worth)"),
    "concurrency": (int, "requests in flight across all workers"),
    "breaker_failures": (int, "consecutive failures that open the circuit"),
    "breaker_cooldown": (duration, "how long an open circuit sends nothing (e.g. 30s)"),
}


def register(sub: Any) -> None:
    p = sub.add_parser("limits", help="shared rate limits, caps and breakers: list, set, clear, reset")
    lsub = p.add_subparsers(dest="limits_command", required=True, metavar="COMMAND")
    ll = lsub.add_parser("list", help="every rule and every key in use, with its live state")
    ll.add_argument("--json", action="store_true")
    ls = lsub.add_parser("set", help="create or change a rule (the settings given; 'off' removes one)")
    ls.add_argument("key", help="host:api.example.com, host:*, tenant:acme, tenant:acme|host:*, ...")
    for setting, (kind, text) in SETTINGS.items():
        ls.add_argument("--" + setting.replace("_", "-"), dest=setting, type=_or_off(kind), help=text)
    ls.add_argument("--note", help="why the rule is what it is (shown in limits list)")
    lc = lsub.add_parser("clear", help="delete a rule")
    lc.add_argument("key", help="the rule's key")
    lr = lsub.add_parser("reset", help="lift a key's pause, close its breaker, bring its requests back")
    lr.add_argument("key", help="the key")
    p.set_defaults(func=limits)


def limits(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.limits_command == "list":
            rows = conn.execute(sql.query("limit_status")).fetchall()
            emit(args, rows, lambda r: table(r, ["key", "rate", "burst", "concurrency", "tokens",
                                                 "in_flight", "breaker", "paused_until", "why"],
                                             title="limits"))
        elif args.limits_command == "set":
            given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
            if not given and args.note is None:
                raise InvalidInput("limits set: give at least one of --rate, --burst, --concurrency, "
                                   "--breaker-failures, --breaker-cooldown, --note")
            changes: dict[str, Any] = {k: None if v == OFF else v for k, v in given.items()}
            if args.note is not None:
                changes["note"] = args.note
            conn.execute(sql.query("limit_set"), {"key": args.key, "changes": Jsonb(changes),
                                                 "who": env.operator, "reason": None})
            say(f"limit {args.key} set; every worker applies it at once")
        elif args.limits_command == "clear":
            row = conn.execute(sql.query("limit_delete"), {"key": args.key, "who": env.operator,
                                                          "reason": None}).fetchone()
            if not row or not row["deleted"]:
                raise NotFound(f"no limit rule {args.key!r} (see: pgdispatch limits list)")
            say(f"limit {args.key} cleared")
        else:
            row = conn.execute(sql.query("limit_reset"), {"key": args.key, "who": env.operator,
                                                         "reason": None}).fetchone()
            say(f"limit {args.key} reset ({row['back'] if row else 0} waiting requests back)")
    return EXIT_OK
