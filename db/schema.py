"""Bringing a database to the current schema: alembic for real databases, sql/schema/ for tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import tuple_row

from pgdispatch import sql
from pgdispatch.db.connections import DIRECT, ConnectionSettings
from pgdispatch.db.errors import SchemaMissing, translate, translated

if TYPE_CHECKING:
    from alembic.config import Config

# The alembic/ folder sits beside db/ in a checkout and in an installed package alike.
ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(database_url: str, settings: ConnectionSettings = DIRECT) -> Config:
    # alembic (and SQLAlchemy under it) is imported here, not at the top: every worker process
    # imports this module, and loading them costs ~0.3 s per process start.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["database_url"] = database_url
    config.attributes["connect_kwargs"] = settings.kwargs(autocommit=False)
    return config


def migrate(database_url: str, revision: str = "head", *, settings: ConnectionSettings = DIRECT) -> None:
    """Apply every pending migration up to `revision` (idempotent): one revision per
    transaction, each under a transaction-scoped lock (alembic/env.py), so migrators started
    together take turns and it may go through a pooler in transaction mode."""
    # Each revision's INFO line is noise next to the one-line result the CLI prints.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from alembic import command
    config = alembic_config(database_url, settings)
    script = ScriptDirectory.from_config(config)
    found = script.get_current_head() if revision == "head" else script.get_revision(revision).revision
    if found is None:
        raise SchemaMissing(f"no migration {revision!r}")
    target: str = found
    if current_revision(database_url, settings) is None and _has_schema(database_url, settings):
        raise SchemaMissing("this database has a pgdispatch schema but no record of its migrations (it was "
                            "built from the fresh schema by an older pgdispatch): record the revision it was "
                            "built at with INSERT INTO public.alembic_version VALUES ('NNNN')")
    try:
        with translated():
            while (current := current_revision(database_url, settings)) is None or current < target:
                try:
                    command.upgrade(config, "+1")  # relative to the revision read under the lock
                except CommandError:
                    if current_revision(database_url, settings) == current:
                        raise  # not another migrator's progress: a real error
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.Error):
            raise translate(exc.orig) from exc
        raise


def head_revision() -> str:
    """The newest migration this code carries (its revision id)."""
    return sql.migration_files()[-1].name[:4]


def schema_problem(conn: psycopg.Connection[Any]) -> str | None:
    """Why this code cannot run on the database `conn` is connected to; None when it can.
    (A schema built from sql/schema/ records itself as the newest revision.)"""
    cur = conn.cursor(row_factory=tuple_row)
    row = cur.execute("SELECT to_regclass('dispatch.jobs') IS NOT NULL, "
                      "to_regclass('public.alembic_version') IS NOT NULL").fetchone()
    assert row is not None
    has_schema, recorded = row
    if not has_schema:
        return "this database lacks the pgdispatch schema"
    if recorded:
        found = cur.execute("SELECT version_num FROM public.alembic_version").fetchone()
        if found is not None and str(found[0]) < head_revision():
            return f"this database's schema is at revision {found[0]}; this code needs {head_revision()}"
    return None


def _has_schema(database_url: str, settings: ConnectionSettings) -> bool:
    with translated(), psycopg.connect(database_url, **settings.kwargs()) as conn:
        row = conn.execute("SELECT to_regclass('dispatch.jobs') IS NOT NULL").fetchone()
    return bool(row and row[0])


def current_revision(database_url: str, settings: ConnectionSettings = DIRECT) -> str | None:
    with translated(), psycopg.connect(database_url, **settings.kwargs()) as conn:
        exists = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None


def apply_migration(filename: str) -> None:
    """Inside an alembic revision: execute sql/migrations/<filename> on the migration's connection."""
    from alembic import op

    connection = op.get_bind().connection.driver_connection
    assert connection is not None, "alembic runs migrations on an open connection"
    connection.execute(sql.read(f"migrations/{filename}").encode())


def apply_schema_sql(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Create the whole schema from sql/schema/*.sql, file by file (fresh databases, tests),
    recorded as the newest revision, so that `migrate` finds it current and applies only what
    comes later."""
    for path in sql.schema_files():
        conn.execute(path.read_text(encoding="utf-8").encode())
    conn.execute("CREATE TABLE IF NOT EXISTS public.alembic_version (version_num varchar(32) NOT NULL "
                 "CONSTRAINT alembic_version_pkc PRIMARY KEY)")
    conn.execute("DELETE FROM public.alembic_version")
    conn.execute("INSERT INTO public.alembic_version (version_num) VALUES (%s)", (head_revision(),))
