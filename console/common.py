"""What every command shares: the environment, argument types, the connection, output."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table

from pgdispatch.db.connections import ConnectionSettings
from pgdispatch.db.errors import ConfigurationError, DatabaseUnavailable, translated
from pgdispatch.db.server import (
    checked_database_url,
    embedded_exists,
    embedded_running,
    embedded_server,
    stop_embedded,
)
from pgdispatch.worker.build import build_number, read_stamp
from pgdispatch.worker.job import JobArgsLoader
from pgdispatch.worker.outbound.destinations import Destinations

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_NO_DATABASE, EXIT_PARTLY = 0, 1, 2, 3, 4, 5

PROG = "pgdispatch"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
Conn = psycopg.Connection[dict[str, Any]]


@dataclass(frozen=True)
class Env:
    """The environment, read once (here and nowhere else), then passed explicitly.

    Without DATABASE_URL the embedded server under `home` is used, and every command says so
    (once, on stderr). Only the commands that set a machine up (worker, migrate, embedded)
    create one; the others need it to exist, and stop it again if they had to start it."""

    database_url: str | None
    listen_url: str | None
    home: Path
    build: int
    app: str | None
    allowed_destinations: tuple[str, ...]
    operator: str  # who runs this command line: the audit log's "who"
    log_level: int
    log_format: str = "text"  # PGDISPATCH_LOG_FORMAT: text or json (one JSON object per line)
    # DATABASE_URL is a pooler in transaction mode (PgBouncer): no prepared statements.
    transaction_pooler: bool = False
    # The console's own login (PGDISPATCH_DASHBOARD_URL), and a console account's new password
    # for scripts (PGDISPATCH_PASSWORD; never shown).
    dashboard_url: str | None = None
    password: str | None = field(default=None, repr=False)
    # Embedded servers this command started (a mutable record in a frozen value: what the
    # command did, not a setting).
    started: list[Path] = field(default_factory=list, compare=False)
    _announced: list[bool] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def read(cls) -> Env:
        level = os.environ.get("PGDISPATCH_LOG", "INFO").strip().upper()
        if level not in LOG_LEVELS:
            raise ConfigurationError(f"PGDISPATCH_LOG={os.environ['PGDISPATCH_LOG']!r}: "
                                     f"one of {', '.join(LOG_LEVELS)}")
        database_url = os.environ.get("DATABASE_URL")
        if database_url is not None and not database_url.strip():
            # Set but empty (a systemd unit's Environment=DATABASE_URL=): a mistake, never a
            # reason to fall back to an embedded server nobody asked for.
            raise ConfigurationError("DATABASE_URL is set but empty: give it a postgresql:// URL, or "
                                     "unset it to use the embedded server")
        home = Path(os.environ.get("PGDISPATCH_HOME") or ".pgdispatch")
        if home.exists() and not home.is_dir():
            raise ConfigurationError(f"PGDISPATCH_HOME={home}: not a directory (it is where the "
                                     "embedded server keeps its data)")
        return cls(database_url=database_url,
                   listen_url=os.environ.get("PGDISPATCH_LISTEN_URL") or None,
                   home=home,
                   build=_build(), app=os.environ.get("PGDISPATCH_APP") or None,
                   allowed_destinations=tuple(
                       d.strip() for d in os.environ.get("PGDISPATCH_ALLOW_DESTINATIONS", "").split(",")
                       if d.strip()),
                   operator=f"{getpass.getuser()}@{socket.gethostname()}",
                   log_level=getattr(logging, level),
                   log_format=_log_format(),
                   transaction_pooler=_flag("PGDISPATCH_TRANSACTION_POOLER"),
                   dashboard_url=os.environ.get("PGDISPATCH_DASHBOARD_URL") or None,
                   password=os.environ.get("PGDISPATCH_PASSWORD"))

    def destinations(self) -> Destinations:
        """The destination policy a worker started here with no flags would have: private
        networks forbidden with DATABASE_URL (allowed on the embedded demo server), and
        PGDISPATCH_ALLOW_DESTINATIONS."""
        try:
            return Destinations(allow_private=not self.database_url, allowed=self.allowed_destinations)
        except ValueError as exc:
            raise ConfigurationError(f"PGDISPATCH_ALLOW_DESTINATIONS: {exc}") from None

    @property
    def connections(self) -> ConnectionSettings:
        return ConnectionSettings(transaction_pooler=self.transaction_pooler)

    def url(self, *, create: bool = False) -> str:
        """DATABASE_URL, else the embedded server's URL, started if it was stopped; created
        only with `create` (worker, migrate, embedded), else a missing one is an error."""
        if self.database_url:
            return checked_database_url(self.database_url)
        running = embedded_running(self.home)
        if running is None:
            if not create and not embedded_exists(self.home):
                raise DatabaseUnavailable(
                    f"DATABASE_URL is unset and there is no embedded PostgreSQL in {self.home.resolve()}: "
                    "set DATABASE_URL, or create one here with `pgdispatch worker --migrate` "
                    "(or `pgdispatch migrate`)")
            running = embedded_server(self.home).url
            self.started.append(self.home)
        if not self._announced:
            self._announced.append(True)
            print(f"{PROG}: using the embedded PostgreSQL in {self.home.resolve()} (DATABASE_URL is unset)"
                  f"{', started it' if self.started else ''}: psql '{running}'", file=sys.stderr)
        return running

    def stop_what_it_started(self) -> None:
        """A command that is not meant to leave a server running stops the one it started."""
        for home in self.started:
            if stop_embedded(home):
                print(f"{PROG}: stopped the embedded PostgreSQL it had started", file=sys.stderr)
        self.started.clear()

    def where(self) -> str:
        return "DATABASE_URL" if self.database_url else f"embedded PostgreSQL in {self.home.resolve()}"


def _log_format() -> str:
    value = os.environ.get("PGDISPATCH_LOG_FORMAT", "text").strip().lower() or "text"
    if value not in ("text", "json"):
        raise ConfigurationError(f"PGDISPATCH_LOG_FORMAT={os.environ['PGDISPATCH_LOG_FORMAT']!r}: "
                                 "text or json")
    return value


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{name}={os.environ[name]!r}: say 1 or 0 (true/false, yes/no, on/off)")


def _build() -> int:
    """PGDISPATCH_BUILD (a number or a stamp), else the stamp in PGDISPATCH_BUILD_FILE, else 0."""
    if build := os.environ.get("PGDISPATCH_BUILD"):
        return build_number(build, source="PGDISPATCH_BUILD")
    if path := os.environ.get("PGDISPATCH_BUILD_FILE"):
        return build_number(read_stamp(Path(path)), source=f"the build stamp in {path}")
    return 0


# -- argument types -----------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(text: str) -> float:
    """'90', '90s', '5m', '2h', '7d', '250ms' → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 5m, 2h, 7d)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


def json_object(flag: str) -> Callable[[str], dict[str, Any]]:
    """The argument type of a flag that takes a JSON object; `@FILE` reads it from a file (so
    secrets stay out of shell history)."""
    def parse(text: str) -> dict[str, Any]:
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text()
            except OSError as exc:
                raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{flag} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {type(value).__name__}")
        return value

    return parse


# -- database -----------------------------------------------------------------------------------

def connect(env: Env) -> Conn:
    with translated():
        conn = psycopg.connect(env.url(), row_factory=dict_row, connect_timeout=10,
                               **env.connections.kwargs())
    # A job's args that cannot be decoded (absurd nesting from before the schema refused it)
    # show as such instead of a traceback.
    conn.adapters.register_loader("jsonb", JobArgsLoader)
    return conn


def db_now_plus(conn: Conn, seconds: float) -> datetime:
    row = conn.execute("SELECT now() + make_interval(secs => %s) AS t", (seconds,)).fetchone()
    assert row is not None
    return row["t"]  # type: ignore[no-any-return]


# -- output -------------------------------------------------------------------------------------

# Piped output (scripts, logs) is not cut to 80 columns.
_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)


def say(text: str) -> None:
    """One line of plain output (no markup: user data may contain brackets)."""
    _out.print(text, markup=False)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], None]) -> None:
    """JSON with --json (for scripts), else `render` it for a person."""
    if getattr(args, "json", False):
        print(json.dumps(data, default=_json_default, indent=2))
    else:
        render(data)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None,
          full: Sequence[str] = ()) -> None:
    """A table of rows; long cells are cut, except in the `full` columns."""
    if not rows:
        say(f"{title}: (none)" if title else "(none)")
        return
    grid = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(cell(row.get(c), cut=c not in full) for c in columns))
    _out.print(grid)


def fields(row: dict[str, Any], *, skip: Sequence[str] = ()) -> None:
    """A record as 'name: value' lines, nothing cut (a person reads one record whole)."""
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, dict | list):
            say(f"{key}: {json.dumps(value, default=_json_default)}")
        else:
            say(f"{key}: {cell(value, cut=False)}")


def cell(value: object, *, cut: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    text = str(value).replace("\n", " ")
    return text if not cut or len(text) <= 60 else text[:57] + "..."


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
