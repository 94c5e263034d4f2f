"""pgdispatch command line: maintenance and the worker entry point.

Environment (read here and nowhere else):
  DATABASE_URL      the PostgreSQL to use; unset: an embedded server under $PGDISPATCH_HOME
  PGDISPATCH_HOME   where the embedded server keeps its data (default ./.pgdispatch)
  PGDISPATCH_BUILD  this code's build (version guard): a number or a stamp sha-YYYYMMDDHHMMSS;
                    default: the stamp in $PGDISPATCH_BUILD_FILE, else 0
  PGDISPATCH_APP    the worker's --app (module:attribute)
  PGDISPATCH_LISTEN_URL  the worker's --listen-url
  PGDISPATCH_LOG    log level (default INFO)
  PGDISPATCH_LOG_FORMAT  text (default) or json: one JSON object per line, for log shippers
  PGDISPATCH_DASHBOARD_URL  the console's own login (default DATABASE_URL)
  PGDISPATCH_PASSWORD       a console account's password for `users add|passwd` in scripts

Exit codes: 0 ok, 1 error, 2 bad usage or input, 3 not found, 4 database unavailable,
5 partly done (a bulk action skipped some items, each named with why), 10 worker saw jobs of a
newer build (--exit-on-newer), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import NoReturn

from pgdispatch.console import (
    bench,
    build,
    commands,
    completion,
    crm,
    dashboard,
    dead,
    embedded,
    jobs,
    leads,
    limits,
    processes,
    queues,
    requests,
    worker,
)
from pgdispatch.console.common import (
    EXIT_ERROR,
    EXIT_NO_DATABASE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Env,
)
from pgdispatch.db.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    PgDispatchError,
)
from pgdispatch.worker.telemetry import configure_logging

# One module per noun; each adds its subcommands.
NOUNS = (worker, jobs, dead, queues, limits, processes, commands, leads, crm, requests, dashboard, build,
         bench, embedded, completion)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line (and exit 2), not the whole usage text; a group given no
    subcommand (`pgdispatch dead`) prints its help, which lists them."""

    def error(self, message: str) -> NoReturn:
        missing = message.removeprefix("the following arguments are required: ")
        if missing != message and (missing.endswith("_command") or missing == "COMMAND"):
            self.print_help(sys.stderr)
            self.exit(EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in NOUNS:
        noun.register(sub)
    _fill_in(parser)
    return parser


def _fill_in(parser: argparse.ArgumentParser) -> None:
    """What every command shares says so once: --json, and every default beside its option."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.formatter_class = argparse.ArgumentDefaultsHelpFormatter
                _fill_in(child)
        elif action.dest == "json" and not action.help:
            action.help = "print JSON (for scripts) instead of a table"


def version() -> str:
    try:
        return importlib.metadata.version("pgdispatch")
    except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:  # bare `pgdispatch`: what it can do
        parser.print_help()
        return EXIT_OK
    args = parser.parse_args(argv)  # bad usage: argparse prints one line, exit 2
    env: Env | None = None
    try:
        env = Env.read()
        configure_logging(env.log_level, env.log_format)
        return int(args.func(env, args))
    except DatabaseUnavailable as exc:
        return _fail(exc, EXIT_NO_DATABASE)
    except NotFound as exc:
        return _fail(exc, EXIT_NOT_FOUND)
    except (InvalidInput, ConfigurationError) as exc:
        return _fail(exc, EXIT_USAGE)
    except PgDispatchError as exc:
        return _fail(exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    finally:
        # Only the commands that set a machine up leave the embedded server running.
        if env is not None and not getattr(args, "keeps_embedded", False):
            env.stop_what_it_started()


def _fail(exc: Exception, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
