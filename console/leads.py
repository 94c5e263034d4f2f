"""Leads and their integrations (seed 002): send, resend, show; credentials list, add, enable,
disable, test."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_ERROR,
    EXIT_OK,
    Conn,
    Env,
    connect,
    duration,
    emit,
    fields,
    json_object,
    say,
    table,
    warn,
)
from pgdispatch.db.errors import InvalidInput, NotFound, translated

RESEND_CHUNK = 500  # leads per transaction of a bulk resend


def register(sub: Any) -> None:
    p = sub.add_parser("leads", help="send a lead to its integrations, resend, show what happened")
    lsub = p.add_subparsers(dest="leads_command", required=True, metavar="COMMAND")
    ls = lsub.add_parser("send", help="to every enabled integration of its entity and project, or to --type")
    ls.add_argument("id", type=int, help="the lead")
    ls.add_argument("--type", action="append", dest="types", metavar="T",
                    help="only integrations of this type (repeatable)")
    ls.add_argument("--delay", type=duration, default=0.0, help="send after this long (30s, 5m)")
    ls.add_argument("--json", action="store_true")
    lr = lsub.add_parser("resend", help="many leads (the seed's bulk resend); prints its summary")
    source = lr.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", type=_ids, help="1,2,3")
    source.add_argument("--from-file", type=Path, metavar="F", help="lead ids, one per line ('-': stdin)")
    lr.add_argument("--type", action="append", dest="types", metavar="T",
                    help="only this integration type (repeat; default: every enabled one)")
    lr.add_argument("--json", action="store_true")
    lw = lsub.add_parser("show", help="the lead, every batch and delivery, and every attempt's log")
    lw.add_argument("id", type=int, help="the lead")
    lw.add_argument("--json", action="store_true")
    p.set_defaults(func=leads)

    c = sub.add_parser("credentials", help="integration credentials: list, add, enable, disable, test")
    csub = c.add_subparsers(dest="credentials_command", required=True, metavar="COMMAND")
    cl = csub.add_parser("list", help="secrets masked")
    cl.add_argument("--json", action="store_true")
    ca = csub.add_parser("add", help="a new credential, its settings checked for its type")
    ca.add_argument("--type", required=True, help="email, amocrm, telegram, bitrix24 or webhooks")
    ca.add_argument("--name", required=True, help="a name people recognise")
    ca.add_argument("--settings", required=True, type=json_object("--settings"), metavar="JSON|@FILE",
                    help="the channel's settings as JSON, or @file.json (keeps secrets out of shell history)")
    ca.add_argument("--entity", action="append", type=int, default=[],
                    help="an external entity id (repeatable)")
    ca.add_argument("--project", action="append", type=int, default=[],
                    help="an external project id (repeatable)")
    ca.add_argument("--disabled", action="store_true", help="added switched off")
    for action in ("enable", "disable"):
        ce = csub.add_parser(action, help=f"{action} a credential")
        ce.add_argument("id", type=int, help="the credential")
    ct = csub.add_parser("test", help="a real call to the API that says what is wrong (sends no lead)")
    ct.add_argument("id", type=int, help="the credential")
    c.set_defaults(func=credentials)


def leads(env: Env, args: argparse.Namespace) -> int:
    with connect(env) as conn, translated():
        if args.leads_command == "send":
            batch = conn.execute(sql.query("send_lead"), {
                "lead_id": args.id, "types": args.types, "delay": args.delay}).fetchone()
            assert batch is not None
            return _show_batch(conn, args, batch["batch_id"])
        if args.leads_command == "resend":
            summary = _resend(conn, _lead_ids(args), args.types, who=env.operator, quiet=args.json)
            emit(args, summary, lambda s: say(json.dumps({k: v for k, v in s.items() if k != "batches"},
                                                         ensure_ascii=False)))
            return EXIT_OK if not summary["errors_count"] else EXIT_ERROR
        lead = conn.execute(sql.query("lead_get"), {"id": args.id}).fetchone()
        if lead is None:
            raise NotFound(f"no lead {args.id}")
        shown = {**lead,
                 "batches": conn.execute(sql.query("lead_batches"), {"id": args.id}).fetchall(),
                 "deliveries": conn.execute(sql.query("lead_deliveries"), {"id": args.id}).fetchall(),
                 "log": conn.execute(sql.query("lead_logs"), {"id": args.id}).fetchall()}

        def render(d: dict[str, Any]) -> None:
            fields(d, skip=("batches", "deliveries", "log"))
            table(d["batches"], ["id", "total", "pending", "succeeded", "failed", "skipped", "created_at",
                                 "finished_at"], title="batches")
            table(d["deliveries"], ["id", "batch_id", "credential", "type", "status", "attempts", "error"],
                  title="deliveries")
            table(d["log"], ["at", "delivery_id", "type", "attempt", "status", "http_status", "error",
                             "response_excerpt"], title="log")

        emit(args, shown, render)
    return EXIT_OK


def _show_batch(conn: Conn, args: argparse.Namespace, batch_id: int) -> int:
    rows = conn.execute(sql.query("batch_deliveries"), {"batch_id": batch_id}).fetchall()
    result = {"batch_id": batch_id, "deliveries": rows}

    def render(r: dict[str, Any]) -> None:
        sent = sum(1 for d in rows if d["status"] == "pending")
        say(f"batch {batch_id}: {sent} deliveries queued, {len(rows) - sent} skipped")
        if rows:
            table(rows, ["type", "credential_id", "status", "error"])

    emit(args, result, render)
    return EXIT_OK


def _resend(conn: Conn, ids: list[int], types: list[str] | None, *, who: str, quiet: bool) -> dict[str, Any]:
    from rich.progress import Progress

    summary: dict[str, Any] = {"dispatched_count": 0, "total_count": 0, "errors_count": 0, "errors": [],
                               "batches": []}
    with Progress(transient=True, disable=quiet or not sys.stderr.isatty()) as progress:
        task = progress.add_task("resending", total=len(ids))
        for start in range(0, len(ids), RESEND_CHUNK):
            chunk = ids[start:start + RESEND_CHUNK]
            row = conn.execute(sql.query("resend_leads"), {"lead_ids": chunk, "types": types,
                                                           "who": who}).fetchone()
            assert row is not None
            for key, value in row["summary"].items():
                summary[key] += value
            progress.update(task, advance=len(chunk))
    return summary


def _lead_ids(args: argparse.Namespace) -> list[int]:
    if args.ids is not None:
        return list(args.ids)
    text = sys.stdin.read() if str(args.from_file) == "-" else _read(args.from_file)
    return _ids(",".join(line.split("#", 1)[0] for line in text.splitlines()))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        raise argparse.ArgumentTypeError(f"not a lead id: {bad!r} (give whole numbers, 1,2,3)") from None
    if not ids:
        raise argparse.ArgumentTypeError("no lead ids given")
    return ids


def credentials(env: Env, args: argparse.Namespace) -> int:
    action = args.credentials_command
    with connect(env) as conn, translated():
        if action == "list":
            rows = conn.execute(sql.query("credential_list")).fetchall()
            emit(args, rows, lambda r: table(r, ["id", "type", "name", "enabled", "entities", "projects",
                                                 "settings"], title="credentials"))
            return EXIT_OK
        if action == "add":
            with conn.transaction():
                row = conn.execute(sql.query("credential_add"), {
                    "type": args.type, "name": args.name, "settings": Jsonb(args.settings),
                    "enabled": not args.disabled}).fetchone()
                assert row is not None
                for link, query in [(e, "credential_link_entity") for e in args.entity] + \
                                   [(p, "credential_link_project") for p in args.project]:
                    conn.execute(sql.query(query), {"id": row["id"], "link": link})
            say(f"credential {row['id']} added ({args.type} {args.name!r})")
            return EXIT_OK
        if action in ("enable", "disable"):
            changed = conn.execute(sql.query("credential_enable"), {
                "id": args.id, "enabled": action == "enable", "who": env.operator, "reason": None}).fetchone()
            if changed is None:
                raise NotFound(f"no credential {args.id}")
            say(f"credential {args.id} ({changed['type']} {changed['name']!r}) {action}d")
            return EXIT_OK
        credential = conn.execute(sql.query("credential_get"), {"id": args.id}).fetchone()
    if credential is None:
        raise NotFound(f"no credential {args.id}")
    return asyncio.run(_test(env, credential))


async def _test(env: Env, credential: dict[str, Any]) -> int:
    from pgdispatch.worker.channels import CHECKS, CheckFailed
    from pgdispatch.worker.channels.delivery import NotSent
    from pgdispatch.worker.executors.context import executor_context
    from pgdispatch.worker.executors.lead_delivery import DeliveryIO

    check = CHECKS.get(credential["type"])
    if check is None:
        warn(f"credential {credential['id']}: pgdispatch does not deliver to {credential['type']}, "
             "nothing to test")
        return EXIT_ERROR
    # The worker's own policy and limits: a check that could reach what a delivery may not
    # would only mislead.
    async with executor_context(env.url(), destinations=env.destinations(), max_connections=4,
                                settings=env.connections) as context:
        try:
            verdict = await check(credential["settings"], DeliveryIO(context, credential["id"],
                                                                     list(credential["limit_scopes"])))
        except (CheckFailed, NotSent) as exc:
            why = " ".join(str(exc).split())  # an HTML error page: one line of it
            warn(f"credential {credential['id']} ({credential['type']} {credential['name']!r}): {why}")
            return EXIT_ERROR
    say(f"credential {credential['id']} ({credential['type']} {credential['name']!r}): ok, {verdict}")
    return EXIT_OK
