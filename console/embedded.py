"""The embedded PostgreSQL (used when DATABASE_URL is unset): its URL, and stopping it."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import psycopg

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, Env, say
from pgdispatch.db.errors import ConfigurationError
from pgdispatch.db.server import embedded_running, stop_embedded


def register(sub: Any) -> None:
    m = sub.add_parser("embedded", help="the embedded PostgreSQL: url, stop")
    m.add_argument("embedded_command", choices=["url", "stop"], metavar="url|stop",
                   help="url: print the URL to connect to (DATABASE_URL when set); stop: stop the server")
    m.add_argument("--force", action="store_true", help="stop: even under live workers")
    m.set_defaults(func=embedded, keeps_embedded=True)


def embedded(env: Env, args: argparse.Namespace) -> int:
    if args.embedded_command == "url":
        say(env.database_url or env.url(create=True))
        return EXIT_OK
    if env.database_url:
        raise ConfigurationError("DATABASE_URL is set: there is no embedded server to stop")
    url = embedded_running(env.home)
    if url is None:
        say("embedded PostgreSQL was not running")
        return EXIT_OK
    alive = _alive_workers(url)
    if alive and not args.force:
        raise ConfigurationError(
            f"{len(alive)} live worker(s) use this database ({', '.join(alive)}): stop them first, "
            "or add --force to stop the database under them")
    stop_embedded(env.home)
    say("embedded PostgreSQL stopped")
    return EXIT_OK


def _alive_workers(url: str) -> list[str]:
    # A database without the schema (never migrated) has no workers either.
    with contextlib.suppress(psycopg.Error), psycopg.connect(url, connect_timeout=5) as conn:
        return [f"{r[0]} pid {r[1]}" for r in conn.execute(sql.query("alive_workers")).fetchall()]
    return []
