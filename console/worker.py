"""The worker pool, and migrations."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

import psycopg

from pgdispatch import sql
from pgdispatch.console.common import EXIT_OK, Env, connect, duration, port, positive_int, say
from pgdispatch.db.errors import ConfigurationError, DatabaseUnavailable, SchemaMissing, translate
from pgdispatch.db.schema import migrate as apply_migrations
from pgdispatch.db.schema import schema_problem


def register(sub: Any) -> None:
    sub.add_parser("migrate", help="apply pending migrations (idempotent)").set_defaults(
        func=migrate, keeps_embedded=True)

    w = sub.add_parser("worker", help="run the worker pool")
    w.add_argument("--queue", action="append",
                   help="queue to work (repeatable; default: every queue, including new ones)")
    w.add_argument("--processes", type=positive_int, default=1, help="worker processes (default 1)")
    w.add_argument("--concurrency", type=positive_int, default=200,
                   help="job slots per process (default 200: twice the claim size, so that the "
                        "next claim is on its way while a batch runs)")
    w.add_argument("--batch", type=positive_int, default=100, help="most jobs per claim (default 100)")
    w.add_argument("--drain", action="store_true", help="run what is runnable now, then exit")
    w.add_argument("--time-limit", type=duration, default=0, help="stop after this long (e.g. 1h)")
    w.add_argument("--memory-limit", type=int, default=0,
                   help="restart a process whose RSS exceeds this many MiB")
    w.add_argument("--http-port", type=port, help="serve /health /stats /metrics on this port")
    w.add_argument("--lease", type=duration, default=30.0, help="lease length (default 30s)")
    w.add_argument("--poll-interval", type=duration, default=1.0, help="poll when idle (default 1s)")
    w.add_argument("--rescue-interval", type=duration, default=5.0,
                   help="sweep expired leases this often (default 5s)")
    w.add_argument("--grace", type=duration, default=25.0,
                   help="on SIGTERM, wait this long for running jobs (default 25s); a second "
                        "SIGTERM or Ctrl-C releases them at once")
    w.add_argument("--exit-on-newer", action="store_true",
                   help="exit with code 10 when jobs of a newer build wait")
    w.add_argument("--per-host-limit", type=positive_int, default=64,
                   help="HTTP requests in flight to one host per process (default 64)")
    w.add_argument("--breaker-failures", type=positive_int, default=5,
                   help="consecutive failures that open a (tenant, host) circuit (default 5)")
    w.add_argument("--breaker-cooldown", type=duration, default=30.0,
                   help="how long an open circuit sends nothing before one probe (default 30s)")
    w.add_argument("--history-keep", type=duration, default=14 * 86400,
                   help="keep the attempt history this long (default 14d)")
    w.add_argument("--dead-keep", type=duration, default=30 * 86400,
                   help="keep dead letters this long (default 30d)")
    w.add_argument("--fetch-cooldown", type=duration, default=0.002,
                   help="claim at most once per this long on NOTIFY bursts (default 2ms)")
    w.add_argument("--app", metavar="MODULE:ATTR",
                   help="your pgdispatch.App, imported in every process (default $PGDISPATCH_APP)")
    w.add_argument("--listen-url", metavar="URL",
                   help="a direct URL for LISTEN when DATABASE_URL goes through a pooler in "
                        "transaction mode (default $PGDISPATCH_LISTEN_URL, else DATABASE_URL)")
    w.add_argument("--transaction-pooler", action="store_true", default=None,
                   help="DATABASE_URL is a pooler in transaction mode (PgBouncer): no connection "
                        "prepares statements (default $PGDISPATCH_TRANSACTION_POOLER); LISTEN needs "
                        "--listen-url, a direct URL")
    w.add_argument("--debug-kinds", action="store_true",
                   help="also run the debug.* kinds (tests and benchmarks)")
    private = w.add_mutually_exclusive_group()
    private.add_argument("--allow-private-networks", dest="allow_private_networks",
                         action="store_true", default=None,
                         help="let requests reach loopback/private/link-local addresses "
                              "(default only with the embedded server)")
    private.add_argument("--forbid-private-networks", dest="allow_private_networks",
                         action="store_false", help="refuse them (default with DATABASE_URL)")
    w.add_argument("--allow-destination", action="append", metavar="NET|HOST",
                   help="a network (127.0.0.1, 10.0.0.0/8) or host name requests may reach even "
                        "when private networks are forbidden (repeatable; default "
                        "$PGDISPATCH_ALLOW_DESTINATIONS, comma-separated)")
    w.add_argument("--migrate", action="store_true", help="apply migrations before starting")
    w.set_defaults(func=worker, keeps_embedded=True)


def migrate(env: Env, args: argparse.Namespace) -> int:
    apply_migrations(env.url(create=True), settings=env.connections)
    say(f"schema is up to date ({env.where()})")
    return EXIT_OK


def worker(env: Env, args: argparse.Namespace) -> int:
    from pgdispatch.worker.app import load_app
    from pgdispatch.worker.config import WorkerConfig
    from pgdispatch.worker.outbound.destinations import Destinations
    from pgdispatch.worker.pool import WorkerPool
    from pgdispatch.worker.process import run_event_loop

    # Mistakes in the settings first: one line, before anything is started or printed.
    app = args.app or env.app
    if app is not None:
        load_app(app)
    allow_private = (args.allow_private_networks if args.allow_private_networks is not None
                     else not env.database_url)
    allowed = tuple(args.allow_destination or env.allowed_destinations)
    try:
        destinations = Destinations(allow_private=allow_private, allowed=allowed)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    url = env.url(create=True)
    if args.transaction_pooler:
        env = dataclasses.replace(env, transaction_pooler=True)
    if args.migrate:
        apply_migrations(url, settings=env.connections)
    # Then the database, once and in one line, rather than in every child process.
    listen_url = args.listen_url or env.listen_url
    with connect(env) as conn:
        conn.execute(sql.query("ping"))
        problem = schema_problem(conn)
    if problem is not None:
        raise SchemaMissing(f"{problem}: run: pgdispatch migrate (or start the worker with --migrate)")
    if listen_url is not None:
        try:
            psycopg.connect(listen_url, connect_timeout=10).close()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"--listen-url: {translate(exc)}") from None
    logging.getLogger("pgdispatch.worker").info("outbound requests: %s", destinations.describe())
    config = WorkerConfig(
        database_url=url, listen_url=listen_url, app=app, queues=tuple(args.queue or ()),
        concurrency=args.concurrency, max_batch=args.batch, version=env.build, lease_seconds=args.lease,
        poll_interval=args.poll_interval, grace_seconds=args.grace, drain=args.drain,
        exit_on_newer=args.exit_on_newer, memory_limit_mb=args.memory_limit,
        rescue_interval=args.rescue_interval, per_host_limit=args.per_host_limit,
        breaker_failures=args.breaker_failures, breaker_cooldown=args.breaker_cooldown,
        history_keep_seconds=args.history_keep, dead_keep_seconds=args.dead_keep,
        fetch_cooldown=args.fetch_cooldown, debug_kinds=args.debug_kinds,
        allow_private_networks=allow_private, allowed_destinations=allowed,
        transaction_pooler=env.transaction_pooler)
    pool = WorkerPool(config, processes=args.processes, time_limit=args.time_limit,
                      http_port=args.http_port, log_level=env.log_level, log_format=env.log_format)
    return run_event_loop(pool.run())
