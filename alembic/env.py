"""Alembic environment: one psycopg connection to the URL db/schema.py hands over.

Each run applies the pending revisions it is asked for in one transaction, under a
transaction-scoped advisory lock taken before the current revision is read: migrators started
together (several workers with --migrate) take turns and never apply a revision twice, and the
lock is released by the commit itself, whatever the connection goes through. (A session lock
taken through a pooler in transaction mode is released in a later transaction, which may run on
another server connection: the lock then stays held on a pooled connection nobody owns, and the
next migration waits for ever.) db/schema.py runs one revision per run, so a revision that adds
an enum value and one that uses it never share a transaction."""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from alembic import context

database_url: str = context.config.attributes["database_url"]
connect_kwargs: dict[str, Any] = context.config.attributes.get("connect_kwargs", {})
engine = create_engine("postgresql+psycopg://",
                       creator=lambda: psycopg.connect(database_url, **connect_kwargs), poolclass=NullPool)

with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=False)
    with context.begin_transaction():
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('pgdispatch.migrate'))")
        context.run_migrations()
engine.dispose()
