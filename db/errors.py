"""The one exception root of pgdispatch, and the translation of driver errors into it.

    PgDispatchError
     ├── DatabaseUnavailable   the server cannot be reached (connect, restart, network)
     ├── InvalidInput          the database refused a value: the message names the constraint
     ├── NotFound              an id or name that does not exist
     ├── ConfigurationError    a setting that cannot work
     ├── NotAllowed            the database refused the caller the right (a console user's scope)
     └── SchemaMissing         the database lacks the schema (or this version of it): migrate
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pg_errors


class PgDispatchError(Exception):
    """Root of every error pgdispatch raises on purpose."""


class DatabaseUnavailable(PgDispatchError):
    """The PostgreSQL server cannot be reached or went away."""


class InvalidInput(PgDispatchError):
    """The database refused a value; the message says which field and why."""

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class NotFound(PgDispatchError):
    """A job id, queue or other name that does not exist."""


class ConfigurationError(PgDispatchError):
    """A setting that cannot work as given."""


class NotAllowed(PgDispatchError):
    """The caller may not do this (a viewer's action, another enterprise's config)."""


class SchemaMissing(PgDispatchError):
    """The database has no pgdispatch schema, or an older one than this code needs."""


_INPUT_ERRORS = (
    pg_errors.IntegrityError,
    pg_errors.DataError,
    pg_errors.RaiseException,
)


def translate(exc: psycopg.Error) -> PgDispatchError:
    """Map a driver error to the most specific pgdispatch error."""
    if connection_lost(exc):
        return DatabaseUnavailable(f"database unavailable: {first_line(exc)}")
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InvalidSchemaName | pg_errors.UndefinedFunction) \
            and "dispatch" in str(exc):
        return SchemaMissing(f"{first_line(exc)}: this database lacks the pgdispatch schema "
                             "(or a newer version of it); run: pgdispatch migrate")
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        return NotAllowed(exc.diag.message_primary or first_line(exc))
    if isinstance(exc, pg_errors.NoDataFound):  # a function's "no lead 42", "no process 7"
        return NotFound(exc.diag.message_primary or first_line(exc))
    if isinstance(exc, _INPUT_ERRORS):
        diag = exc.diag
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        if isinstance(exc, pg_errors.ForeignKeyViolation) and diag.message_detail:
            detail = f" ({diag.message_detail.replace('Failing row contains', 'row')})"
        if isinstance(exc, pg_errors.CheckViolation):
            detail = ""  # the failing row is noise (and may carry secrets); the name says it all
        return InvalidInput(f"{diag.message_primary or first_line(exc)}{detail}",
                            constraint=diag.constraint_name)
    return PgDispatchError(first_line(exc))


@contextmanager
def translated() -> Iterator[None]:
    """Run a block with driver errors translated once, at this boundary."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc


def connection_lost(exc: psycopg.Error) -> bool:
    """No server answer at all, a connection failure (08), or the server shutting down (57P)."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
