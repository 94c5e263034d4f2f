"""Benchmarks: pgdispatch beside its peers, on fresh databases (the harness loads on demand)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

import psycopg

from pgdispatch.bench import SCENARIOS
from pgdispatch.console.common import EXIT_OK, Env, say
from pgdispatch.db.errors import ConfigurationError, InvalidInput, translated


def register(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure pgdispatch beside its peers, on fresh databases")
    b.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="repeatable (default: all)")
    b.add_argument("--vs", help="comma-separated peers: pgqueuer, pgqueuer-psycopg, pgqueuer-asyncpg, "
                                "procrastinate, none (default: every installed peer)")
    b.add_argument("--jobs", type=int, default=50_000, help="drain: no-op jobs (default 50,000)")
    b.add_argument("--requests", type=int, default=20_000, help="deliver: requests (default 20,000)")
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=bench)


def bench(env: Env, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from pgdispatch.bench import report

    url = env.url()
    try:
        peers = report.expand_peers(args.vs.split(",")) if args.vs is not None else report.installed_peers()
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    missing = sorted(set(peers) - set(report.installed_peers()))
    if missing:
        raise ConfigurationError(f"peer not installed: {', '.join(missing)}; run pip install -e '.[bench]'")
    with translated(), psycopg.connect(url, connect_timeout=10) as conn:
        server = conn.execute("SHOW server_version").fetchone()
    machine = {"cores": os.cpu_count(), "postgresql": server[0] if server else "?",
               "python": platform.python_version(), "peers": peers, "rounds": args.rounds}
    chosen = args.scenario or list(SCENARIOS)
    if not args.json:
        say(f"# machine: {json.dumps(machine)}")
    with Progress(transient=True, disable=args.json) as progress:
        task = progress.add_task("bench", total=None)

        def emit(result: dict[str, Any]) -> None:
            progress.update(task, description=f"round {result.get('round')}/{args.rounds}: "
                                              f"{result.get('scenario')} {result.get('system')}")
            if not args.json:
                progress.console.print(json.dumps(result), markup=False, highlight=False)

        results = report.run(url, chosen=chosen, peers=peers, rounds=args.rounds,
                             jobs=args.jobs, requests=args.requests, emit=emit)
    rows = report.reduce(results)
    checks = report.targets(rows)
    if args.json:
        print(json.dumps({"machine": machine, "results": results, "summary": rows,
                          "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks]},
                         indent=2))
    else:
        say("")
        say(report.markdown(rows))
        say("")
        if any(key in row for row in rows for key in report.COSTS):
            say(report.cost_markdown(rows))
            say("")
        if any(row["scenario"].startswith("cost: ") for row in rows):
            say(report.sizing_markdown(rows))
            say("")
        say(report.targets_markdown(checks))
    return EXIT_OK
