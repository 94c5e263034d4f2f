"""Alembic environment: one psycopg connection to the URL db/schema.py hands over."""

from __future__ import annotations

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from alembic import context

database_url: str = context.config.attributes["database_url"]
engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(database_url),
                       poolclass=NullPool)

with engine.connect() as connection:
    # One migrator at a time, even when several workers start together.
    connection.exec_driver_sql("SELECT pg_advisory_lock(hashtext('pgdispatch.migrate'))")
    connection.commit()  # the lock is the session's; each revision then commits on its own
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
    connection.exec_driver_sql("SELECT pg_advisory_unlock(hashtext('pgdispatch.migrate'))")
    connection.commit()
engine.dispose()
