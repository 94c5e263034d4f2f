"""CRM call events (seed 004): an enterprise's integrations config (get, set, test), the state
of its CRMs, and a call event by hand."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_ERROR,
    EXIT_OK,
    Env,
    connect,
    emit,
    fields,
    json_object,
    say,
    table,
    warn,
)
from pgdispatch.db.errors import InvalidInput, NotFound, translated


def register(sub: Any) -> None:
    p = sub.add_parser("crm", help="CRM call events: enterprises' integrations config, status, a test event")
    csub = p.add_subparsers(dest="crm_command", required=True, metavar="COMMAND")
    config = csub.add_parser("config", help="an enterprise's integrations config: get, set, test")
    osub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    get = osub.add_parser("get", help="the config, secrets masked")
    get.add_argument("enterprise", help="the enterprise's number")
    get.add_argument("--json", action="store_true")
    put = osub.add_parser("set", help="set fields of one integration (merged into what is there); "
                                      "creates the enterprise if it is new")
    put.add_argument("enterprise", help="the enterprise's number (created when new)")
    put.add_argument("integration", help="retailcrm or webhook")
    put.add_argument("--settings", type=json_object("--settings"), default={},
                     help='JSON object or @FILE, e.g. \'{"api_url": "...", "api_key": "..."}\'')
    switch = put.add_mutually_exclusive_group()
    switch.add_argument("--enable", action="store_const", const=True, dest="enabled",
                        help="send events to it")
    switch.add_argument("--disable", action="store_const", const=False, dest="enabled",
                        help="send it nothing (the config is kept)")
    put.add_argument("--name", help="the enterprise's name (when it is created; default: its number)")
    test = osub.add_parser("test", help="a real call to each enabled CRM that says what is wrong "
                                        "(sends no event)")
    test.add_argument("enterprise", help="the enterprise's number")
    test.add_argument("integration", nargs="?", help="only this one")
    status = csub.add_parser("status", help="each enterprise's CRMs: last success, last error, breaker")
    status.add_argument("enterprise", nargs="?", help="only this enterprise (default: every one)")
    status.add_argument("--json", action="store_true")
    event = csub.add_parser("event", help="send a call event (dispatch.call_event) as the telephony "
                                          "side does")
    event.add_argument("enterprise", help="the enterprise's number")
    event.add_argument("event", choices=["dial", "bridge", "hangup", "download"], help="what happened")
    event.add_argument("call_unique_id", help="the call's id (the same id and event again create nothing)")
    event.add_argument("--payload", type=json_object("--payload"), default={}, help='JSON object or @FILE')
    event.add_argument("--json", action="store_true")
    p.set_defaults(func=crm)


def crm(env: Env, args: argparse.Namespace) -> int:
    command = args.config_command if args.crm_command == "config" else args.crm_command
    with connect(env) as conn, translated():
        if command == "get":
            row = conn.execute(sql.query("enterprise_config_masked"), {"number": args.enterprise}).fetchone()
            if row is None:
                raise NotFound(f"no enterprise {args.enterprise}")
            emit(args, row, fields)
            return EXIT_OK
        if command == "set":
            if not args.settings and args.enabled is None:
                raise InvalidInput("nothing to set: give --settings, --enable or --disable")
            changes = dict(args.settings)
            if args.enabled is not None:
                changes["enabled"] = args.enabled
            row = conn.execute(sql.query("enterprise_integration_set"), {
                "number": args.enterprise, "name": args.name, "integration": args.integration,
                "changes": Jsonb(changes), "who": env.operator, "reason": None}).fetchone()
            assert row is not None
            enabled = row["integrations_config"][args.integration]["enabled"]
            say(f"enterprise {args.enterprise}: {args.integration} "
                f"{'enabled' if enabled else 'disabled'}, {', '.join(sorted(changes))} set")
            return EXIT_OK
        if command == "status":
            with conn.transaction():
                conn.execute(sql.query("operator_reads"))
                rows = conn.execute(sql.query("integration_status_of"),
                                    {"number": args.enterprise}).fetchall()
            emit(args, rows, lambda r: table(r, ["enterprise", "integration", "enabled", "last_success_at",
                                                 "last_error_at", "last_error", "breaker"], title="CRMs"))
            return EXIT_OK
        if command == "event":
            rows = conn.execute(sql.query("call_event"), {
                "number": args.enterprise, "event": args.event, "call": args.call_unique_id,
                "payload": Jsonb(args.payload)}).fetchall()
            emit(args, rows, lambda r: table(r, ["integration", "job_id", "created"], title="jobs")
                 if r else say(f"enterprise {args.enterprise} has no enabled CRM: nothing queued"))
            return EXIT_OK
        row = conn.execute(sql.query("enterprise_config"), {"number": args.enterprise}).fetchone()
    if row is None:
        raise NotFound(f"no enterprise {args.enterprise}")
    return asyncio.run(_test(env, args.enterprise, row["integrations_config"], args.integration))


async def _test(env: Env, number: str, config: Mapping[str, Any], only: str | None) -> int:
    from pgdispatch.worker.channels import CRM_CHECKS, CheckFailed
    from pgdispatch.worker.channels.delivery import NotSent
    from pgdispatch.worker.executors.context import executor_context
    from pgdispatch.worker.executors.crm_event import TIMEOUT, crm_tenant
    from pgdispatch.worker.executors.outbound_io import LimitedIO

    if only is not None and only not in config:
        raise NotFound(f"enterprise {number} has no {only} config")
    chosen = {name: s for name, s in config.items() if name == only or (only is None and s.get("enabled"))}
    if not chosen:
        warn(f"enterprise {number}: no enabled CRM to test")
        return EXIT_ERROR
    # The worker's own policy and the enterprise's shared limits: a check that could reach what
    # an event may not would only mislead.
    failed = False
    async with executor_context(env.url(), destinations=env.destinations(), max_connections=4,
                                settings=env.connections) as context:
        for name, settings in sorted(chosen.items()):
            io = LimitedIO(context, crm_tenant(number, name), timeout=TIMEOUT)
            try:
                verdict = await CRM_CHECKS[name](settings, io)
            except (CheckFailed, NotSent) as exc:
                why = " ".join(str(exc).split())  # an HTML error page: one line of it
                warn(f"enterprise {number} {name}: {why}")
                failed = True
                continue
            say(f"enterprise {number} {name}: ok, {verdict}")
    return EXIT_ERROR if failed else EXIT_OK
