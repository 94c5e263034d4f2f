"""The operators' console (issue 21) through its HTTP interface, as a browser without JavaScript
sees it, connected as its own database role (dispatch_console and nothing more), against a real
PostgreSQL and real workers. The browser itself: tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import psycopg
import pytest

import pgdispatch
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.runner import Runner
from tests.console_support import PASSWORD, Console, add_user, console, logged_in
from tests.helpers import execute, running_worker, scalar
from tests.test_leads import credential
from tests.test_secrets import leaks_in, run_planted

SCRIPT = "<script>alert('pwned')</script>"


def job(db_url: str, kind: str = "demo.job", *, queue: str = "default", args: dict[str, Any] | None = None,
        tenant: str | None = None, error: str | None = None) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("INSERT INTO dispatch.jobs (queue, kind, args, tenant, last_error) VALUES (%s, %s, %s, %s, %s) "
                           "RETURNING id", (queue, kind, json.dumps(args or {}), tenant, error)).fetchone()
    assert row is not None
    return int(row[0])


def dead(db_url: str, reason: str = "exhausted", *, queue: str = "default", error: str = "HTTP 500",
         expired: bool = False) -> int:
    job_id = job(db_url, queue=queue)
    execute(db_url, "WITH gone AS (DELETE FROM dispatch.jobs WHERE id = %s RETURNING *) "
                    "INSERT INTO dispatch.dead_jobs (job_id, queue, kind, args, priority, tenant, version, attempt, "
                    "reason, last_error, created_at, expire_at) SELECT id, queue, kind, args, priority, tenant, version, "
                    "3, %s, %s, created_at, CASE WHEN %s THEN now() - interval '1 hour' END FROM gone",
            (job_id, reason, error, expired))
    return job_id


# -- pages, JavaScript off -------------------------------------------------------------------------------

async def test_every_page_renders_its_data_as_html_alone(db_url: str) -> None:
    live = job(db_url, "billing.charge", args={"order_id": 4242}, tenant="acme", error="HTTP 503 from billing")
    gone = dead(db_url, "stop_code", error="HTTP 418 teapot")
    with psycopg.connect(db_url, autocommit=True) as conn:
        credential(conn, "webhooks", {"url": "https://hooks.example/in"}, name="orders hook", entity=10)
        conn.execute("INSERT INTO dispatch.leads (id, external_entity_id, data) VALUES (1, 10, '{\"name\": \"Ann\"}')")
        conn.execute("SELECT dispatch.send_lead(1)")
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                     (json.dumps({"retailcrm": {"enabled": True, "api_url": "https://acme.retailcrm.ru",
                                                "api_key": "k", "user_mappings": {"151": 16}}}),))
        conn.execute("INSERT INTO dispatch.commands (key, name, schedule) VALUES ('nightly', 'Nightly import', '0 3 * * *')")
    async with logged_in(db_url, "ann", "admin") as ann:
        pages = {
            "/overview": ["default", "Workers", "Last hour"],
            "/jobs": [str(live), "billing.charge", "acme"],
            '/jobs?args={"order_id": 4242}': [str(live)],
            f"/jobs/{live}": ["4242", "HTTP 503 from billing"],
            "/dead": [str(gone), "stop_code", "HTTP 418 teapot"],
            f"/jobs/{gone}": ["stop_code", "HTTP 418 teapot"],
            "/commands": ["nightly", "Nightly import", "Safe to stop"],
            "/leads": ["Lead batches"],
            "/credentials": ["orders hook", "hooks.example"],
            "/crm": ["0367", "Acme"],
            "/crm/0367": ["acme.retailcrm.ru", "set: type to replace"],
            "/crm/0367?tab=settings": ['value="151"', 'value="16"'],
            "/crm/0367?tab=logs": ["latest 500 call events"],
            "/audit": ["Audit log"],
            "/users": ["ann"],
            "/processes": ["Processes"],
        }
        for path, wanted in pages.items():
            status, html = await ann.get(path)
            assert status == 200, (path, html[:500])
            for text in wanted:
                assert text in html, (path, text)
            assert "<script>" not in html.replace('<script src="', "")  # only our own files


async def test_lists_say_how_far_they_looked_and_offer_to_look_further(db_url: str) -> None:
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'bulk.job' FROM generate_series(1, 1200)")
    rare = job(db_url, "rare.job")
    execute(db_url, "INSERT INTO dispatch.jobs (kind) SELECT 'bulk.job' FROM generate_series(1, 120)")
    async with logged_in(db_url, "ann", "viewer", scan_limit=50, page_size=10) as ann:
        status, html = await ann.get("/jobs?kind=rare.job")
        assert status == 200 and f"/jobs/{rare}" not in html  # not among the newest 50 rows read
        assert "Search further" in html and "Looked at 50 rows" in html
        further = re.search(r'href="([^"]*before=\d+[^"]*)">Search further', html)
        assert further is not None
        for _ in range(5):  # each step reads at most 50 more rows
            status, html = await ann.get(further.group(1).replace("&amp;", "&"))
            if f"/jobs/{rare}" in html:
                break
            further = re.search(r'href="([^"]*before=\d+[^"]*)">Search further', html)
            assert further is not None
        assert f"/jobs/{rare}" in html
        # Counts past the cap are the planner's estimate, and say so.
        execute(db_url, "ANALYZE dispatch.jobs")
        status, html = await ann.get("/overview")
        assert status == 200 and "≈" in html and "exact up to 1,000" in html


# -- who may do what --------------------------------------------------------------------------------------

async def test_logins_set_safe_cookies_and_failures_slow_down_then_stop(db_url: str) -> None:
    add_user(db_url, "ann", "operator")
    async with console(db_url) as client:
        session = Console(client)
        answer = await session.login("ann")
        assert answer.status == 303
        cookie = answer.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert scalar(db_url, "SELECT count(*) FROM dispatch.console_sessions WHERE user_name = 'ann'") == 1
        assert len(scalar(db_url, "SELECT token_hash FROM dispatch.console_sessions")) == 32  # a SHA-256, not the token
        assert (await session.post("/logout"))[0] == 303
        assert (await session.get("/jobs"))[0] == 302  # the session is over
        for _attempt in range(5):
            began = time.monotonic()
            answer = await session.login("ann", "wrong password")
            assert answer.status == 401 and "Wrong name or password" in await answer.text()
            assert time.monotonic() - began >= 0.9  # each failure waits
        answer = await session.login("ann")  # the right password, too late: the name is locked out a while
        assert answer.status == 429 and "Too many failed logins" in await answer.text()
        unknown = await session.login("nobody", "whatever")
        assert unknown.status == 401  # an unknown name answers as a wrong password does


async def test_a_post_without_the_sessions_csrf_token_is_refused(db_url: str) -> None:
    async with logged_in(db_url, "ann", "operator") as ann:
        status, html = await ann.post("/queues/default/pause", csrf=False)
        assert status == 403 and "did not come from this console" in html
        status, _ = await ann.post("/queues/default/pause", {"csrf": "forged"}, csrf=False)
        assert status == 403
        assert scalar(db_url, "SELECT paused FROM dispatch.queues WHERE name = 'default'") is False
        assert (await ann.post("/queues/default/pause"))[0] == 303
        assert scalar(db_url, "SELECT paused FROM dispatch.queues WHERE name = 'default'") is True
        assert scalar(db_url, "SELECT who || ' ' || action || ' ' || target FROM dispatch.audit_log") == \
            "ann@console pause queue:default"


ACTIONS = [  # every action route, with a form that would work for an operator
    ("/queues/default/pause", {}), ("/queues/default/resume", {}), ("/queues/default/settings", {"concurrency": "2"}),
    ("/limits/set", {"key": "host:a.example", "rate": "5"}), ("/limits/reset", {"key": "host:a.example"}),
    ("/limits/delete", {"key": "host:a.example", "confirm": "yes"}),
    ("/jobs/cancel", {"id": "{job}", "confirm": "yes"}), ("/jobs/run-now", {"id": "{job}"}),
    ("/dead/retry", {"id": "{dead}"}), ("/dead/purge", {"id": "{dead}", "confirm": "yes"}),
    ("/processes/1/restart", {}), ("/processes/1/work", {}), ("/processes/1/abandon", {"reason": "x", "confirm": "yes"}),
    ("/commands/switch", {"enable": "no", "confirm": "yes"}), ("/commands/nightly/run", {}),
    ("/commands/nightly/unlock", {"confirm": "yes"}),
    ("/leads/resend", {"lead": "1"}), ("/credentials/1/disable", {}), ("/credentials/1/test", {}),
    ("/crm/0367/retailcrm/settings", {"event_dial": "yes"}), ("/crm/0367/retailcrm/connection", {"api_key": "new"}),
    ("/crm/0367/retailcrm/test", {}), ("/crm/0367/retailcrm/breaker", {}),
    ("/users/add", {"name": "eve", "role": "admin", "password": "x" * 12}), ("/users/ann/disable", {}),
]


async def test_a_viewer_has_no_action_that_works(db_url: str) -> None:
    live, gone = job(db_url), dead(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        credential(conn, "webhooks", {"url": "https://hooks.example/in"}, entity=10)
        conn.execute("INSERT INTO dispatch.leads (id, external_entity_id, data) VALUES (1, 10, '{}')")
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                     (json.dumps({"retailcrm": {"enabled": True, "api_url": "https://a.retailcrm.ru", "api_key": "k"}}),))
        conn.execute("INSERT INTO dispatch.commands (key, name, schedule) VALUES ('nightly', 'N', '0 3 * * *')")
    before = scalar(db_url, "SELECT md5(string_agg(t::text, ',')) FROM (SELECT * FROM dispatch.queues ORDER BY name) t")
    async with logged_in(db_url, "vic", "viewer") as vic:
        for path, form in ACTIONS:
            data = {k: v.format(job=live, dead=gone) for k, v in form.items()}
            status, html = await vic.post(path, data)
            assert status == 403, (path, status, html[:300])
    assert scalar(db_url, "SELECT count(*) FROM dispatch.audit_log") == 0
    assert scalar(db_url, "SELECT md5(string_agg(t::text, ',')) FROM (SELECT * FROM dispatch.queues ORDER BY name) t") == before
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE id = %s", (live,)) == 1
    assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs WHERE job_id = %s", (gone,)) == 1
    # And the database says no too, were the console's Python to let one through.
    with psycopg.connect(db_url) as conn:
        conn.execute("SELECT set_config('pgdispatch.console_user', 'vic', true)")
        for statement in ("SELECT dispatch.pause_queue_v1('default', true, 'vic')",
                          "SELECT dispatch.cancel_jobs_v1(ARRAY[1], 'x', 'vic')",
                          "SELECT dispatch.console_require_operator()",
                          "SELECT dispatch.set_enterprise_integration_v1('0367', 'retailcrm', '{}', 'vic')",
                          "SELECT dispatch.add_console_user_v1('eve', 'admin', NULL, '{}', '{}', 'vic')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
            conn.rollback()
            conn.execute("SELECT set_config('pgdispatch.console_user', 'vic', true)")


async def test_an_enterprise_admin_sees_only_their_enterprises_and_entities(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for number in ("0367", "0401"):
            conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES (%s, %s, %s)",
                         (number, f"Enterprise {number}", json.dumps({"retailcrm": {
                             "enabled": True, "api_url": f"https://e{number}.retailcrm.ru", "api_key": "k"}})))
        mine = credential(conn, "webhooks", {"url": "https://hooks.example/mine"}, name="my hook", entity=10)
        credential(conn, "webhooks", {"url": "https://hooks.example/theirs"}, name="their hook", entity=11)
        conn.execute("INSERT INTO dispatch.leads (id, external_entity_id, data) VALUES (1, 10, '{}'), (2, 11, '{}')")
    async with logged_in(db_url, "erin", "enterprise_admin", enterprises=("0367",), entities=(10,)) as erin:
        status, html = await erin.get("/crm")
        assert status == 200 and "0367" in html and "0401" not in html
        assert (await erin.get("/crm/0367"))[0] == 200
        status, html = await erin.get("/crm/0401")  # by URL: as if it did not exist
        assert status == 404 and "e0401" not in html
        assert (await erin.post("/crm/0401/retailcrm/settings", {"event_dial": "yes"}))[0] == 403
        assert (await erin.post("/crm/0367/retailcrm/settings", {"event_dial": "yes"}))[0] == 303
        status, html = await erin.get("/credentials")
        assert "my hook" in html and "their hook" not in html
        assert (await erin.post(f"/credentials/{mine + 1}/disable"))[0] == 403
        status, html = await erin.post("/leads/resend", {"lead": "1 2"})
        assert status == 200 and "lead 2 is not one of your entities" in html
        for engine_page in ("/overview", "/jobs", "/dead", "/processes", "/commands", "/audit", "/users"):
            assert (await erin.get(engine_page))[0] == 403, engine_page
        status, _ = await erin.get("/")
        assert status == 302  # home for an enterprise admin is their CRM page
    assert scalar(db_url, "SELECT integrations_config -> 'retailcrm' -> 'events' FROM dispatch.enterprises "
                          "WHERE number = '0401'") is None


async def test_a_trusted_proxy_names_the_user_and_nobody_else_can(db_url: str) -> None:
    import ipaddress

    add_user(db_url, "ann", "viewer")
    async with console(db_url, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
                       user_header="X-Forwarded-User") as client:
        answer = await client.get("/jobs", headers={"X-Forwarded-User": "ann"}, allow_redirects=False)
        assert answer.status == 200 and "ann" in await answer.text()
        answer = await client.get("/jobs", headers={"X-Forwarded-User": "mallory"}, allow_redirects=False)
        assert answer.status == 302  # no such account: the login page
    async with console(db_url, trusted_proxies=(ipaddress.ip_network("10.9.9.9/32"),),
                       user_header="X-Forwarded-User") as client:
        answer = await client.get("/jobs", headers={"X-Forwarded-User": "ann"}, allow_redirects=False)
        assert answer.status == 302  # the header from an untrusted address is ignored


# -- hostile text and secrets -------------------------------------------------------------------------------

async def test_markup_from_producers_and_remotes_renders_as_text(db_url: str) -> None:
    live = job(db_url, args={"note": SCRIPT}, tenant=SCRIPT, error=f"remote said {SCRIPT}")
    gone = dead(db_url, error=SCRIPT)
    with psycopg.connect(db_url, autocommit=True) as conn:
        credential(conn, "webhooks", {"url": "https://hooks.example/in"}, name=SCRIPT, entity=10)
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', %s, '{}')",
                     (SCRIPT,))
        conn.execute("INSERT INTO dispatch.commands (key, name, schedule) VALUES ('nightly', %s, '0 3 * * *')", (SCRIPT,))
        conn.execute("SELECT dispatch.audit_v1('x', 'note', 'job:1', %s)", (SCRIPT,))
    async with logged_in(db_url, "ann", "admin") as ann:
        for path in ("/jobs", f"/jobs/{live}", "/dead", f"/jobs/{gone}", "/credentials", "/crm", "/crm/0367",
                     "/commands", "/audit", f"/jobs?tenant={SCRIPT}"):
            status, html = await ann.get(path)
            assert status == 200, path
            assert SCRIPT not in html, path
            assert "&lt;script&gt;" in html or "&#34;" in html or "alert" in html, path


async def test_no_planted_secret_reaches_any_page(db_url: str) -> None:
    await run_planted(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs = [r[0] for r in conn.execute("SELECT job_id FROM dispatch.job_history").fetchall()]
        batches = [r[0] for r in conn.execute("SELECT id FROM dispatch.lead_batches").fetchall()]
        processes = [r[0] for r in conn.execute("SELECT id FROM dispatch.processes").fetchall()]
    assert jobs and batches and processes
    leaks: dict[str, list[str]] = {}
    async with logged_in(db_url, "ann", "admin") as ann:
        paths = ["/overview", "/jobs", "/dead", "/processes", "/commands", "/leads", "/credentials", "/crm",
                 "/crm/0367", "/crm/0367?tab=settings", "/crm/0367?tab=logs", "/crm/0367?tab=test", "/audit", "/users"]
        paths += [f"/jobs/{j}" for j in jobs] + [f"/leads/batches/{b}" for b in batches]
        paths += [f"/processes/{p}" for p in processes]
        for path in paths:
            status, html = await ann.get(path)
            assert status == 200, (path, html[:300])
            leaks_in(leaks, path, html)
    assert leaks == {}


# -- actions ---------------------------------------------------------------------------------------------------

async def test_cancelling_a_running_job_stops_its_executor_within_a_second(db_url: str) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def forever(job: pgdispatch.Job) -> pgdispatch.Done:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()
        return pgdispatch.Done()

    running = job(db_url, "slow.job")
    waiting = job(db_url, "other.job")
    async with running_worker(db_url, {"slow.job": forever}) as runner, \
            logged_in(db_url, "olga", "operator") as olga:
        await asyncio.wait_for(started.wait(), 10)
        status, html = await olga.post("/jobs/cancel", [("id", str(running)), ("id", str(waiting)),
                                                        ("id", "999999"), ("reason", "duplicate order")])
        assert status == 200 and "Confirm" in html  # asked first
        assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs") == 0
        began = time.monotonic()
        status, html = await olga.post("/jobs/cancel", [("id", str(running)), ("id", str(waiting)), ("id", "999999"),
                                                        ("reason", "duplicate order"), ("confirm", "yes")])
        assert status == 200 and "2 cancelled, 1 skipped" in html and "not a live job" in html
        await asyncio.wait_for(stopped.wait(), 1.5)
        took = time.monotonic() - began
        assert runner.cancelled == 1
    assert took < 1.5
    rows = psycopg.connect(db_url).execute("SELECT job_id, reason, last_error FROM dispatch.dead_jobs ORDER BY job_id").fetchall()
    assert rows == [(running, "cancelled", "cancelled by olga@console: duplicate order"),
                    (waiting, "cancelled", "cancelled by olga@console: duplicate order")]
    # The worker's own late finish changed nothing: one history row each, the cancel's.
    assert scalar(db_url, "SELECT count(*) FROM dispatch.job_history WHERE job_id = %s", (running,)) == 1
    assert scalar(db_url, "SELECT detail ->> 'count' FROM dispatch.audit_log WHERE action = 'cancel'") == "2"


async def test_cancelling_a_process_step_puts_its_instance_in_error(db_url: str, run: Any) -> None:
    app = pgdispatch.App()

    @app.process("order", "Order", version=1)
    class Order:
        steps = ["charge"]

        async def charge(self, state: dict[str, Any]) -> pgdispatch.StepDone:
            return pgdispatch.StepDone("charged")

    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await app.register(conn)
        process_id = await app.start_process(conn, "order", {})
        await conn.commit()
    step = scalar(db_url, "SELECT id FROM dispatch.jobs WHERE kind = 'process:order'")
    code, out, _ = run("jobs", "cancel", str(step), "--reason", "customer called")
    assert code == 0 and "1 jobs cancelled" in out
    assert scalar(db_url, "SELECT status::text || ': ' || error FROM dispatch.processes WHERE id = %s", (process_id,)) == \
        "error: cancelled by " + scalar(db_url, "SELECT who FROM dispatch.audit_log") + ": customer called"
    code, out, _ = run("jobs", "cancel", str(step))
    assert code == 3 and "already dead" in out


async def test_bulk_retry_of_everything_filtered_names_each_skipped_job(db_url: str) -> None:
    revived = [dead(db_url, queue="requests") for _ in range(3)]
    expired = dead(db_url, "expired", queue="requests", expired=True)
    other = dead(db_url, queue="default")
    async with logged_in(db_url, "olga", "operator") as olga:
        status, html = await olga.post("/dead/retry", {"scope": "filter", "queue": "requests"})
        assert status == 200 and "3 retried, 1 skipped" in html
        assert str(expired) in html and "expire" in html  # named, with why
        assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE id = ANY (%s)", (revived,)) == 3
        assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs WHERE job_id = %s", (other,)) == 1  # not filtered
        status, html = await olga.post("/dead/retry", {"id": str(expired), "expire_in_hours": "24"})
        assert "1 retried" in html
        status, html = await olga.post("/dead/purge", {"id": str(other)})
        assert "Confirm" in html and scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs") == 1
        status, html = await olga.post("/dead/purge", {"id": str(other), "confirm": "yes"})
        assert "1 purged" in html and scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs") == 0
    actions = psycopg.connect(db_url).execute("SELECT action, target FROM dispatch.audit_log ORDER BY id").fetchall()
    assert actions == [("retry", "3 jobs"), ("retry", f"job:{expired}"), ("purge", f"job:{other}")]


async def test_crm_send_flags_decide_which_events_go_to_which_crm(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                     (json.dumps({"retailcrm": {"enabled": True, "api_url": "https://a.retailcrm.ru", "api_key": "k"},
                                  "webhook": {"enabled": True, "url": "https://hooks.example/calls"}}),))
    async with logged_in(db_url, "olga", "operator") as olga:
        status, _ = await olga.post("/crm/0367/retailcrm/settings", {"event_bridge": "yes", "event_hangup": "yes",
                                                                     "event_download": "yes"})
        assert status == 303
        with pytest.raises(psycopg.errors.CheckViolation, match="events must map"):
            execute(db_url, "UPDATE dispatch.enterprises SET integrations_config = jsonb_set(integrations_config, "
                            "'{retailcrm,events}', '{\"ring\": true}')")
    made = psycopg.connect(db_url).execute(
        "SELECT integration FROM dispatch.call_event('0367', 'dial', 'c1', '{}') WHERE created").fetchall()
    assert made == [("webhook",)]  # dial is off for RetailCRM
    made = psycopg.connect(db_url).execute(
        "SELECT integration FROM dispatch.call_event('0367', 'hangup', 'c1', '{}') WHERE created ORDER BY 1").fetchall()
    assert made == [("retailcrm",), ("webhook",)]


async def test_a_connection_test_is_run_by_a_worker_and_answered_on_its_page(db_url: str) -> None:
    from pgdispatch.worker.executors import builtin_executors
    from pgdispatch.worker.executors.context import executor_context
    from pgdispatch.worker.outbound.destinations import Destinations
    from tests.fake_channels import fake_channels

    async with fake_channels() as fake:
        with psycopg.connect(db_url, autocommit=True) as conn:
            good = credential(conn, "webhooks", {"url": f"{fake.url}/hook/200"}, entity=10)
            bad = credential(conn, "webhooks", {"url": f"{fake.url}/hook/500"}, entity=10)
        async with logged_in(db_url, "olga", "operator") as olga:
            answers = {}
            for credential_id in (good, bad):
                answer = await olga.client.post(f"/credentials/{credential_id}/test", data={"csrf": olga.csrf},
                                                allow_redirects=False)
                assert answer.status == 303
                answers[credential_id] = answer.headers["Location"]
            status, html = await olga.get(answers[good])
            assert "Waiting for a worker" in html and "no live worker serves queue leads" in html
            async with executor_context(db_url, destinations=Destinations(allow_private=True),
                                        max_connections=10) as ctx:
                runner = Runner(WorkerConfig(database_url=db_url, drain=True), builtin_executors(ctx))
                await asyncio.wait_for(runner.run(), 30)
            status, html = await olga.get(answers[good])
            assert status == 200 and 'class="banner ok"' in html and "ok," in html
            status, html = await olga.get(answers[bad])
            assert status == 200 and 'class="banner bad"' in html and "500" in html
        async with logged_in(db_url, "vera", "operator") as vera:  # somebody else's test: not shown
            assert (await vera.get(answers[good]))[0] == 404


async def test_users_are_managed_by_admins_and_a_disabled_one_is_logged_out_at_once(db_url: str, run: Any,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGDISPATCH_PASSWORD", "short")
    code, _, err = run("users", "add", "bob", "--role", "operator")
    assert code == 2 and "at least 10 characters" in err
    monkeypatch.setenv("PGDISPATCH_PASSWORD", PASSWORD)
    assert run("users", "add", "bob", "--role", "operator")[0] == 0
    code, _, err = run("users", "add", "bob", "--role", "viewer")
    assert code == 2 and "exists already" in err
    async with logged_in(db_url, "ann", "admin") as ann, console(db_url) as other:
        bob = Console(other)
        assert (await bob.login("bob")).status == 303
        assert (await bob.get("/jobs"))[0] == 200
        assert (await ann.post("/users/bob/disable"))[0] == 303
        assert (await bob.get("/jobs"))[0] == 302  # logged out at once
        assert (await ann.post("/users/add", {"name": "cid", "role": "viewer", "password": PASSWORD}))[0] == 303
        assert (await ann.post("/users/ann/disable"))[0] == 400  # not yourself
    code, out, _ = run("users", "list", "--json")
    assert code == 0 and '"has_password": true' in out and "argon2" not in out
    audit = [r[0] for r in psycopg.connect(db_url).execute("SELECT action FROM dispatch.audit_log ORDER BY id").fetchall()]
    assert audit == ["add user", "disable user", "add user"]  # bob (CLI), bob, cid (console)
