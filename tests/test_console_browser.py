"""The operators' console in a real browser (Chromium from Debian's packages, driven by
Playwright; Playwright never downloads a browser), against a real PostgreSQL and real worker
processes running tests/sample_app/console_app.py. Marked `browser`: skipped with
-m 'not browser'; without chromium installed they skip, unless PGDISPATCH_REQUIRE_BROWSER is set
(CI sets it, so there they fail instead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web

from pgdispatch.dashboard import DashboardConfig, make_app
from tests.console_support import PASSWORD, add_user, console_login
from tests.fake_retailcrm import API_KEY, fake_retailcrm
from tests.helpers import execute, scalar, served, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("PGDISPATCH_CHROMIUM", "/usr/bin/chromium"))
HAVE_CHROMIUM = CHROMIUM.exists()
# The flags Chromium needs as root on a machine with no way out (no sandbox, nothing fetched).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
SCRIPT = "<script>alert('pwned')</script>"


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        message = f"{CHROMIUM} is not installed (apt-get install chromium)"
        if os.environ.get("PGDISPATCH_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def served_console(db_url: str, **settings: Any) -> AsyncIterator[str]:
    """The console on a real port, connected as its own login role; its base URL."""
    with console_login(db_url) as url:
        runner = web.AppRunner(make_app(replace(DashboardConfig(database_url=url), **settings)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        finally:
            await runner.cleanup()


@contextlib.contextmanager
def worker_pool(db_url: str, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`pgdispatch worker` with the sample app, as an operator starts it; stopped with SIGTERM."""
    log = (tmp_path / "worker.log").open("wb")
    env = {**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING",
           "CHECKOUT_PAYMENTS_UP": str(tmp_path / "payments-up")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "worker", "--processes", "1",
                             "--app", "tests.sample_app.console_app:app", "--allow-destination", "127.0.0.1",
                             *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, (tmp_path / "worker.log").read_text()
        finally:
            log.close()


async def log_in(page: Any, base: str, name: str) -> None:
    await page.goto(f"{base}/login")
    await page.fill("input[name=name]", name)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button:has-text('Log in')")
    await page.wait_for_url(lambda url: "/login" not in url)


async def workers_alive(db_url: str) -> None:
    await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.worker_status WHERE status = 'alive'"), 30)


# -- the flows ---------------------------------------------------------------------------------------

async def test_a_failed_request_is_found_among_dead_letters_retried_and_delivered(
        db_url: str, tmp_path: Path, browser: Any) -> None:
    answers = {"status": 418}

    async def remote(request: web.Request) -> web.Response:
        return web.Response(status=answers["status"], text="I'm a teapot" if answers["status"] == 418 else "ok")

    add_user(db_url, "olga", "operator")
    async with served(remote) as url, served_console(db_url) as base:
        with worker_pool(db_url, tmp_path):
            job_id = scalar(db_url, "SELECT dispatch.send_request('POST', %s, stop_codes => '{418}')", (f"{url}/orders",))
            await wait_until(lambda: scalar(db_url, "SELECT reason FROM dispatch.dead_jobs WHERE job_id = %s", (job_id,)), 30)
            page = await browser.new_page()
            await log_in(page, base, "olga")
            await page.click("header >> text=Dead letters")
            row = page.locator("tr", has=page.locator(f"a[href='/jobs/{job_id}']"))
            await row.locator("text=stop_code").wait_for()
            await row.locator("input[name=id]").check()
            answers["status"] = 200  # the remote is fixed
            await page.click("button:has-text('Retry')")
            await page.locator("h1", has_text="1 retried").wait_for()
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE job_id = %s "
                                                    "AND outcome = 'completed'", (job_id,)), 30)
            await page.goto(f"{base}/jobs/{job_id}")
            await page.locator("td >> text=completed").wait_for()
            assert await page.locator("td >> text=dead").count() == 1  # the first attempt, kept in the history


async def test_a_process_in_error_is_restarted_from_a_step_and_another_abandoned(
        db_url: str, tmp_path: Path, browser: Any) -> None:
    from tests.sample_app.console_app import app

    add_user(db_url, "olga", "operator")
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await app.register(conn)
        first = await app.start_process(conn, "checkout", {"order": 1})
        second = await app.start_process(conn, "checkout", {"order": 2})
        await conn.commit()
    async with served_console(db_url) as base:
        with worker_pool(db_url, tmp_path):
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.processes WHERE status = 'error'") == 2, 30)
            page = await browser.new_page()
            await log_in(page, base, "olga")
            await page.goto(f"{base}/processes?status=error")
            await page.click(f"a[href='/processes/{first}']")
            await page.locator("text=the payment provider declined: 402").first.wait_for()
            (tmp_path / "payments-up").touch()  # the provider is back
            await page.select_option("select[name=from_step]", "charge")
            await page.fill("form:has(button:has-text('Restart')) input[name=reason]", "provider fixed")
            await page.click("button:has-text('Restart')")
            await wait_until(lambda: scalar(db_url, "SELECT status::text FROM dispatch.processes WHERE id = %s",
                                            (first,)) == "done", 30)
            await page.reload()
            await page.locator("h1 .pill", has_text="done").wait_for()
            await page.locator("td >> text=shipped").wait_for()  # the journal, step by step
            await page.goto(f"{base}/processes/{second}")
            await page.fill("form:has(button:has-text('Abandon')) input[name=reason]", "customer cancelled")
            await page.click("button:has-text('Abandon')")
            await page.click("button:has-text('Yes, do it')")  # asked before anything destructive
            await page.locator("h1 .pill", has_text="abandoned").wait_for()
            await page.locator("text=customer cancelled").first.wait_for()
    assert scalar(db_url, "SELECT status::text FROM dispatch.processes WHERE id = %s", (second,)) == "abandoned"


async def test_disabling_every_command_says_safe_to_stop_and_enabling_them_brings_them_back(
        db_url: str, tmp_path: Path, browser: Any) -> None:
    add_user(db_url, "olga", "operator")
    async with served_console(db_url) as base:
        with worker_pool(db_url, tmp_path):
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.commands"), 30)
            page = await browser.new_page()
            await log_in(page, base, "olga")
            await page.goto(f"{base}/commands")
            await page.locator("td .pill", has_text="Idle").wait_for()
            await page.fill("form:has(button:has-text('Disable all')) input[name=reason]", "deploy 4.2")
            await page.click("button:has-text('Disable all')")
            await page.click("button:has-text('Yes, do it')")
            await page.locator("#safe-to-stop", has_text="Safe to stop the service").wait_for()
            await page.locator("td .pill", has_text="Disabled").wait_for()
            await page.click("button:has-text('Enable all')")
            await page.locator("td .pill", has_text="Idle").wait_for()
    assert scalar(db_url, "SELECT string_agg(action || ':' || coalesce(reason, ''), ',' ORDER BY id) "
                          "FROM dispatch.audit_log") == "disable:deploy 4.2,enable:"


async def test_editing_user_mappings_changes_the_extension_smart_redirect_answers(
        db_url: str, tmp_path: Path, browser: Any) -> None:
    from tests.test_pool import free_port

    add_user(db_url, "erin", "enterprise_admin", enterprises=("0367",))
    port = free_port()
    async with fake_retailcrm() as crm, served_console(db_url) as base:
        execute(db_url, "INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                (json.dumps({"retailcrm": {"enabled": True, "api_url": crm.api_url("ok"), "api_key": API_KEY,
                                           "user_mappings": {"151": 16}}}),))

        async def redirected() -> str | None:
            """The pool's answer (over HTTP, without blocking this loop: the fake RetailCRM runs on it)."""
            url = f"http://127.0.0.1:{port}/smart-redirect?enterprise=0367&phone=%2B79990001122"
            try:
                async with aiohttp.ClientSession() as session, session.get(url) as answer:
                    return (await answer.json()).get("extension")  # type: ignore[no-any-return]
            except aiohttp.ClientError:
                return None  # the pool's HTTP port is not up yet

        async def answers(extension: str, timeout: float) -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while await redirected() != extension:
                assert asyncio.get_running_loop().time() < deadline, f"smart redirect never answered {extension}"
                await asyncio.sleep(0.1)

        with worker_pool(db_url, tmp_path, "--http-port", str(port)):
            await answers("151", 30)
            page = await browser.new_page()
            await log_in(page, base, "erin")
            assert page.url.endswith("/crm")  # an enterprise admin starts on their CRM page
            await page.click("a[href='/crm/0367']")
            await page.click("nav.tabs >> text=Settings")
            await page.fill("input[name=extension][value='151']", "160")
            await page.click("button:has-text('Save settings')")
            await page.locator("input[name=extension][value='160']").wait_for()
            await answers("160", 10)
    assert API_KEY not in (tmp_path / "worker.log").read_text()


# -- who may do what, hostile text, secrets -----------------------------------------------------------------

async def test_the_browser_cannot_be_made_to_act_beyond_its_role_or_run_a_producers_markup(
        db_url: str, browser: Any) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = conn.execute("INSERT INTO dispatch.jobs (kind, args, tenant, last_error) VALUES "
                              "('demo.job', %s, %s, %s) RETURNING id",
                              (json.dumps({"note": SCRIPT, "api_key": "PLANTED-args-key"}), SCRIPT,
                               f"remote said {SCRIPT} api_key=PLANTED-error-key")).fetchone()[0]  # type: ignore[index]
        for number in ("0367", "0401"):
            conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES (%s, %s, %s)",
                         (number, SCRIPT, json.dumps({"retailcrm": {"enabled": True, "api_url": "https://a.retailcrm.ru",
                                                                    "api_key": "PLANTED-crm-key"}})))
    add_user(db_url, "vic", "viewer")
    add_user(db_url, "erin", "enterprise_admin", enterprises=("0367",))
    dialogs: list[str] = []
    async with served_console(db_url) as base:
        context = await browser.new_context()
        page = await context.new_page()
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await log_in(page, base, "vic")
        for path in ("/jobs", f"/jobs/{job_id}", f"/jobs?tenant={SCRIPT}", "/crm", "/crm/0367"):
            await page.goto(base + path)
            html = await page.content()
            assert "PLANTED" not in html, path
            assert SCRIPT not in html, path
        await page.goto(f"{base}/jobs/{job_id}")
        assert SCRIPT in await page.locator("body").inner_text()  # shown, as text
        csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
        forged = await context.request.post(f"{base}/queues/default/pause", form={"csrf": csrf})
        assert forged.status == 403  # a viewer's session with its own CSRF token: still no
        no_token = await context.request.post(f"{base}/queues/default/pause", form={})
        assert no_token.status == 403
        await context.close()
        context = await browser.new_context()
        page = await context.new_page()
        await log_in(page, base, "erin")
        answer = await page.goto(f"{base}/crm/0401")
        assert answer is not None and answer.status == 404
        assert "no enterprise 0401" in await page.locator("body").inner_text()
        await context.close()
    assert dialogs == []
    assert scalar(db_url, "SELECT paused FROM dispatch.queues WHERE name = 'default'") is False


async def test_every_page_renders_its_data_with_javascript_off(db_url: str, tmp_path: Path, browser: Any) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = conn.execute("INSERT INTO dispatch.jobs (kind, args, tenant) VALUES ('billing.charge', "
                              "'{\"order_id\": 4242}', 'acme') RETURNING id").fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                     (json.dumps({"retailcrm": {"enabled": True, "api_url": "https://acme.retailcrm.ru", "api_key": "k",
                                                "user_mappings": {"151": 16}}}),))
        conn.execute("INSERT INTO dispatch.commands (key, name, schedule) VALUES ('nightly', 'Nightly', '0 3 * * *')")
        conn.execute("INSERT INTO dispatch.credentials (type, name, settings) VALUES ('webhooks', 'orders hook', "
                     "'{\"url\": \"https://hooks.example/in\"}')")
    add_user(db_url, "ann", "admin")
    async with served_console(db_url) as base:
        context = await browser.new_context(java_script_enabled=False)
        page = await context.new_page()
        await log_in(page, base, "ann")  # the login form needs no script either
        expected = {"/overview": "default", "/jobs": "billing.charge", f"/jobs/{job_id}": "4242",
                    "/dead": "Dead letters", "/processes": "Processes", "/commands": "Nightly", "/leads": "Lead batches",
                    "/credentials": "orders hook", "/crm": "Acme", "/crm/0367?tab=settings": "User mappings",
                    "/audit": "Audit log", "/users": "ann"}
        for path, text in expected.items():
            answer = await page.goto(base + path)
            assert answer is not None and answer.status == 200, path
            assert text in await page.locator("main").inner_text(), path
        # A form works without a script: pausing a queue, then the page says so.
        await page.goto(f"{base}/overview")
        await page.locator("tr", has=page.locator("a", has_text="default")).locator("button:has-text('Pause')").click()
        await page.locator("tr", has=page.locator("a", has_text="default")).locator("text=paused").wait_for()
        await context.close()
