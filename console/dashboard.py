"""The operators' console: `dashboard` serves it; `users` manages its accounts."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from typing import Any

import psycopg
from aiohttp import web

from pgdispatch import sql
from pgdispatch.console.common import (
    EXIT_OK,
    Env,
    connect,
    emit,
    say,
    table,
)
from pgdispatch.dashboard import DashboardConfig, make_app
from pgdispatch.dashboard.auth import ROLES, check_password, hash_password
from pgdispatch.dashboard.config import networks
from pgdispatch.db.errors import ConfigurationError, InvalidInput, SchemaMissing, translated
from pgdispatch.db.schema import schema_problem


def _bind(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"HOST:PORT, such as 127.0.0.1:8080, got {text!r}")
    return host.strip("[]"), int(port)


def _networks(text: str) -> Any:
    try:
        return networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    d = sub.add_parser("dashboard", help="serve the operators' console in the browser")
    d.add_argument(
        "--bind",
        type=_bind,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:8080; put it behind HTTPS to expose it)",
    )
    d.add_argument(
        "--database-url",
        help="the console's own login (a role granted dispatch_console); "
        "default: PGDISPATCH_DASHBOARD_URL, else DATABASE_URL",
    )
    d.add_argument(
        "--trusted-proxy",
        type=_networks,
        default=(),
        metavar="ADDRESSES",
        help="reverse proxies whose --user-header is believed (e.g. 127.0.0.1,10.0.0.0/8)",
    )
    d.add_argument("--user-header", help="the header naming the logged-in account (e.g. X-Forwarded-User)")
    d.add_argument(
        "--session-hours",
        type=float,
        default=12.0,
        help="a session ends after this long without a request (default 12)",
    )
    d.add_argument(
        "--secure-cookies",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mark cookies Secure (default: when the request came over HTTPS)",
    )
    d.set_defaults(func=dashboard)

    u = sub.add_parser("users", help="console accounts: add, list, disable, enable, passwd, delete")
    usub = u.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    add = usub.add_parser("add", help="a new account (asks for its password, or reads PGDISPATCH_PASSWORD)")
    add.add_argument("name", help="the login name")
    add.add_argument(
        "--role",
        choices=ROLES,
        required=True,
        help="viewer (reads), operator (and acts), enterprise_admin (their CRM and leads), admin",
    )
    add.add_argument(
        "--enterprise", action="append", default=[], help="an enterprise admin's enterprise (repeat)"
    )
    add.add_argument(
        "--entity",
        action="append",
        type=int,
        default=[],
        help="an enterprise admin's lead entity id (repeat)",
    )
    add.add_argument(
        "--proxy-only",
        action="store_true",
        help="no password: the account logs in only through the trusted proxy",
    )
    lst = usub.add_parser("list", help="every account (no password hashes)")
    lst.add_argument("--json", action="store_true")
    for name, text in (
        ("disable", "no more logins; its sessions end at once"),
        ("enable", "may log in again"),
        ("passwd", "a new password (its sessions end)"),
        ("delete", "remove the account"),
    ):
        usub.add_parser(name, help=text).add_argument("name", help="the login name")
    u.set_defaults(func=users)


def dashboard(env: Env, args: argparse.Namespace) -> int:
    if bool(args.trusted_proxy) != bool(args.user_header):
        raise ConfigurationError(
            "--trusted-proxy and --user-header go together (the header is believed only from those addresses)"
        )
    url = args.database_url or env.dashboard_url or env.url()
    with translated(), psycopg.connect(url, connect_timeout=10, **env.connections.kwargs()) as conn:
        problem = schema_problem(conn)
    if problem is not None:
        raise SchemaMissing(f"{problem}: run: pgdispatch migrate")
    config = DashboardConfig(
        database_url=url,
        connections=env.connections,
        trusted_proxies=args.trusted_proxy,
        user_header=args.user_header,
        session_hours=args.session_hours,
        secure_cookies=args.secure_cookies,
    )
    host, port = args.bind
    print(
        f"pgdispatch dashboard on http://{host}:{port}/ "
        "(add an account: pgdispatch users add NAME --role admin)",
        file=sys.stderr,
    )
    web.run_app(make_app(config), host=host, port=port, print=None, access_log=None)
    return EXIT_OK


def users(env: Env, args: argparse.Namespace) -> int:
    action = args.users_command
    with connect(env) as conn, translated():
        if action == "list":
            rows = conn.execute(sql.query("console_users")).fetchall()
            emit(
                args,
                rows,
                lambda r: table(
                    r,
                    ["name", "role", "enterprises", "entities", "disabled", "has_password", "last_seen_at"],
                    title="console users",
                ),
            )
            return EXIT_OK
        if action == "add":
            if args.role != "enterprise_admin" and (args.enterprise or args.entity):
                raise InvalidInput("--enterprise and --entity are for --role enterprise_admin")
            for number in args.enterprise:
                if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", number):
                    raise InvalidInput(f"--enterprise {number!r}: an enterprise number")
            password_hash = None if args.proxy_only else hash_password(_new_password(env))
            conn.execute(
                sql.query("console_user_add"),
                {
                    "name": args.name,
                    "role": args.role,
                    "password_hash": password_hash,
                    "enterprises": args.enterprise,
                    "entities": args.entity,
                    "who": env.operator,
                },
            )
            say(f"console user {args.name} added ({args.role})")
            return EXIT_OK
        if action in ("disable", "enable"):
            conn.execute(
                sql.query("console_user_set_disabled"),
                {"name": args.name, "disabled": action == "disable", "who": env.operator},
            )
            say(f"console user {args.name} {action}d")
        elif action == "passwd":
            conn.execute(
                sql.query("console_user_password"),
                {"name": args.name, "who": env.operator, "password_hash": hash_password(_new_password(env))},
            )
            say(f"console user {args.name}: password changed; its sessions ended")
        elif action == "delete":
            conn.execute(sql.query("console_user_delete"), {"name": args.name, "who": env.operator})
            say(f"console user {args.name} deleted")
    return EXIT_OK


def _new_password(env: Env) -> str:
    """PGDISPATCH_PASSWORD (scripts), else asked twice on the terminal."""
    password = env.password
    if password is None:
        if not sys.stdin.isatty():
            raise InvalidInput("no terminal to ask for the password: set PGDISPATCH_PASSWORD")
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise InvalidInput("the two passwords differ")
    if (problem := check_password(password)) is not None:
        raise InvalidInput(problem)
    return password
