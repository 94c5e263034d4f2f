"""The console under test: its own login role (dispatch_console and nothing more, so a grant it
lacks fails the test), accounts of each role, an aiohttp test client logged in as one of them."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import psycopg
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql as pgsql

from pgdispatch.dashboard import DashboardConfig, make_app
from pgdispatch.dashboard.auth import hash_password

PASSWORD = "correct horse battery"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextlib.contextmanager
def console_login(db_url: str) -> Iterator[str]:
    """A login role granted dispatch_console only, for this test; the URL it connects with."""
    role = f"pgd_console_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD 'console-test'").format(pgsql.Identifier(role)))
        conn.execute(pgsql.SQL("GRANT dispatch_console TO {}").format(pgsql.Identifier(role)))
    try:
        yield psycopg.conninfo.make_conninfo(db_url, user=role, password="console-test")
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP OWNED BY {}").format(pgsql.Identifier(role)))
            conn.execute(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier(role)))


def add_user(db_url: str, name: str, role: str, *, enterprises: tuple[str, ...] = (),
             entities: tuple[int, ...] = ()) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT dispatch.add_console_user_v1(%s, %s, %s, %s, %s, 'test setup')",
                     (name, role, hash_password(PASSWORD), list(enterprises), list(entities)))
        conn.execute("DELETE FROM dispatch.audit_log WHERE who = 'test setup'")  # the tests' own audit only


class Console:
    """A test client of the console, with the CSRF token of its session once logged in."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.csrf = ""

    async def login(self, name: str, password: str = PASSWORD) -> ClientResponse:
        page = await self.client.get("/login")
        token = CSRF.search(await page.text())
        assert token is not None
        answer = await self.client.post("/login", data={"csrf": token.group(1), "name": name,
                                                        "password": password, "next": "/"},
                                        allow_redirects=False)
        if answer.status == 303:
            home = await self.client.get("/credentials")
            found = CSRF.search(await home.text())
            assert found is not None
            self.csrf = found.group(1)
        return answer

    async def get(self, path: str, **kw: Any) -> tuple[int, str]:
        answer = await self.client.get(path, allow_redirects=False, **kw)
        return answer.status, await answer.text()

    async def post(self, path: str, data: Any = None, *, csrf: bool = True, **kw: Any) -> tuple[int, str]:
        fields = list(data.items()) if isinstance(data, dict) else list(data or [])
        if csrf:
            fields.append(("csrf", self.csrf))
        answer = await self.client.post(path, data=fields, allow_redirects=False, **kw)
        return answer.status, await answer.text()


@contextlib.asynccontextmanager
async def console(db_url: str, **settings: Any) -> AsyncIterator[TestClient[Any, Any]]:
    """The console app on a test server, connected as its own login role."""
    with console_login(db_url) as url:
        config = replace(DashboardConfig(database_url=url), **settings)
        client = TestClient(TestServer(make_app(config)))
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def logged_in(db_url: str, name: str, role: str, **settings: Any) -> AsyncIterator[Console]:
    add_user(db_url, name, role, enterprises=settings.pop("enterprises", ()), entities=settings.pop("entities", ()))
    async with console(db_url, **settings) as client:
        session = Console(client)
        answer = await session.login(name)
        assert answer.status == 303, await answer.text()
        yield session
