"""The SQL files of pgdispatch, and the loader that turns them into named queries.

`schema/NN_noun.sql` is the whole current schema, one file per noun (engine, requests, limits,
commands, processes, leads, crm, console, then the blanket grants), applied in file order to a fresh
database; `migrations/NNNN_*.sql` are the steps alembic runs (they build the same: a test compares);
`queries.sql` holds every statement the Python code sends, each headed `-- name: some_name`.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def read(relative_path: str) -> str:
    """The text of one .sql file under sql/."""
    return (SQL_DIR / relative_path).read_text(encoding="utf-8")


@cache
def queries() -> dict[str, str]:
    """Every named query of queries.sql, by name."""
    text = read("queries.sql")
    parts = _NAME.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in named:
            raise ValueError(f"queries.sql defines {name!r} twice")
        named[name] = body.strip().rstrip(";")
    return named


def query(name: str) -> str:
    """One named query; a KeyError names what is missing."""
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"sql/queries.sql has no query named {name!r}") from None


def schema_files() -> list[Path]:
    """The fresh schema's files, in the order they apply."""
    return sorted((SQL_DIR / "schema").glob("[0-9][0-9]_*.sql"))


def migration_files() -> list[Path]:
    """The migration steps, in the order they apply."""
    return sorted((SQL_DIR / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
