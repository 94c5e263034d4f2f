"""Outbound HTTP requests: send one, show one with every attempt."""

from __future__ import annotations

import argparse
from typing import Any

from psycopg.types.json import Jsonb

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, Env, connect, duration, emit, fields, say, table
from pgdispatch.db.errors import InvalidInput, NotFound, translated


def register(sub: Any) -> None:
    r = sub.add_parser("request", help="outbound HTTP requests: send, show")
    rsub = r.add_subparsers(dest="request_command", required=True, metavar="COMMAND")
    rs = rsub.add_parser("send", help="queue one request (dispatch.send_request)")
    rs.add_argument("--method", required=True, help="GET, POST, PUT, PATCH or DELETE")
    rs.add_argument("--uri", required=True, help="where to send it (http or https)")
    rs.add_argument("--body", help="the request field of the JSON sent (e.g. a JWT)")
    rs.add_argument("--success-code", type=int, default=200, help="the status that means delivered")
    rs.add_argument("--stop-code", type=int, action="append", help="repeatable; 418 always stops")
    rs.add_argument("--expire-in", type=duration, help="give up after this long (e.g. 1d)")
    rs.add_argument("--interval", type=int, default=60, help="seconds between attempts (default 60)")
    rs.add_argument("--limit", type=int, help="attempts (default: derived from expiry, else 1440)")
    rs.add_argument("--timeout", type=int, default=30, help="HTTP timeout in seconds (default 30)")
    rs.add_argument("--header", action="append", help="'Name: value', repeatable")
    rs.add_argument("--queue", default="requests", help="the queue it waits in")
    rs.add_argument("--idempotency-key", help="a second request with this key is not created")
    rs.add_argument("--tenant", help="whose request it is (shared limits apply per tenant)")
    rs.add_argument("--json", action="store_true")
    rw = rsub.add_parser("show", help="a request, its state and every attempt")
    rw.add_argument("id", type=int, help="the job id")
    rw.add_argument("--json", action="store_true")
    r.set_defaults(func=request)


def request(env: Env, args: argparse.Namespace) -> int:
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
                 lambda d: say(f"request queued as job {d['id']}"))
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


def _render_request(job: dict[str, Any]) -> None:
    fields(job, skip=("attempts",))
    say("attempts:")
    table(job["attempts"], ["attempt", "outcome", "status", "duration_ms", "error_message",
                            "started_at"], full=("error_message",))
