"""Call events delivered (seed 004): the crm.event executor, the RetailCRM adapter against a
local fake that answers as RetailCRM does, the webhook CRM, logs, status and the breaker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from standardwebhooks import Webhook

from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors import builtin_executors
from pgdispatch.worker.executors.context import ExecutorContext, executor_context
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.runner import Runner
from tests.fake_retailcrm import API_KEY, FakeRetailCrm, fake_retailcrm
from tests.helpers import execute, in_a_thread, run_cli, running_worker, scalar, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PHONE = "+79990001122"


def retailcrm(fake: FakeRetailCrm, account: str, **settings: Any) -> dict[str, Any]:
    return {"enabled": True, "api_url": fake.api_url(account), "api_key": API_KEY, **settings}


def enterprise(db_url: str, number: str, **config: Any) -> None:
    execute(db_url, "INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES (%s, %s, %s)",
            (number, f"Enterprise {number}", json.dumps(config)))


def call_event(db_url: str, number: str, event: str, call_id: str, **payload: Any) -> None:
    execute(db_url, "SELECT dispatch.call_event(%s, %s, %s, %s)", (number, event, call_id, json.dumps(payload)))


@asynccontextmanager
async def worker_context(db_url: str, **limits: Any) -> AsyncIterator[ExecutorContext]:
    execute(db_url, "UPDATE dispatch.queues SET backoff_base = '10 ms', backoff_cap = '50 ms', backoff_jitter = 0 "
                    "WHERE name = 'crm'")
    async with executor_context(db_url, destinations=Destinations(allow_private=True), max_connections=50,
                                **limits) as context:
        yield context


async def drain(db_url: str) -> None:
    """Drain the crm queue until no job is left (a retry that comes due is run by the next drain)."""
    async with worker_context(db_url) as context:
        while True:
            runner = Runner(WorkerConfig(database_url=db_url, queues=("crm",), drain=True, concurrency=20),
                            builtin_executors(context))
            await asyncio.wait_for(runner.run(), 60)
            if not scalar(db_url, "SELECT count(*) FROM dispatch.jobs"):
                return
            await wait_until(lambda: scalar(db_url, "SELECT min(run_at) <= now() FROM dispatch.jobs"))


def outcomes(db_url: str) -> dict[str, list[tuple[str, str | None]]]:
    """Each enterprise's attempts by attempt number, then error: (outcome, error)."""
    rows = scalar(db_url, """
        SELECT jsonb_object_agg(enterprise, attempts) FROM (
            SELECT enterprise, jsonb_agg(jsonb_build_array(status, error) ORDER BY attempt, error) AS attempts
            FROM dispatch.integration_logs WHERE enterprise IS NOT NULL GROUP BY enterprise) x""")
    return {k: [tuple(a) for a in v] for k, v in (rows or {}).items()}


async def test_each_event_reaches_retailcrm_as_its_telephony_api_wants_it(db_url: str) -> None:
    async with fake_retailcrm() as fake:
        enterprise(db_url, "0367", retailcrm=retailcrm(fake, "ok", client_id="vochi-asterisk",
                                                        user_mappings={"151": 16, "152": 18}))
        common = {"phone": PHONE, "line": "+74950000000"}
        call_event(db_url, "0367", "dial", "c1", extensions=["151", "152", "153"], **common)
        call_event(db_url, "0367", "bridge", "c1", extension="152", **common)
        call_event(db_url, "0367", "hangup", "c1", extension="152", status="no_answer", duration=0, waiting=12,
                   started_at="2026-11-25T10:00:00+03:00", **common)
        call_event(db_url, "0367", "download", "c1", extension="152", status="no_answer",
                   started_at="2026-11-25T10:00:00+03:00", record_url="https://rec.example/c1.mp3", **common)
        call_event(db_url, "0367", "dial", "c2", direction="out", extension="151", phone="+79990003344")
        await drain(db_url)
        assert outcomes(db_url) == {"0367": [("completed", None)] * 5}
        events = [s.form for s in fake.to("telephony/call/event")]
        assert {e["clientId"] for e in events} == {"vochi-asterisk"}
        by_call = sorted((e["event"]["callExternalId"], e["event"]["type"], e["event"].get("hangupStatus"))
                         for e in events)
        assert by_call == [("c1", "hangup", "no answered"), ("c1", "in", None), ("c1", "in", None),
                           ("c2", "out", None)]
        dial = next(e["event"] for e in events if e["event"]["codes"] == ["151", "152", "153"])
        assert dial == {"phone": PHONE, "type": "in", "codes": ["151", "152", "153"], "userIds": [16, 18],
                        "callExternalId": "c1", "externalPhone": "+74950000000"}
        # Events of one call may reach the CRM in any order (README): found by what they carry.
        uploads = sorted((s.form["calls"][0] for s in fake.to("telephony/calls/upload")), key=lambda u: "recordUrl" in u)
        assert uploads[0] == {"date": "2026-11-25 10:00:00", "type": "in", "phone": PHONE, "result": "no answer",
                              "duration": 0, "durationWaiting": 12, "externalId": "c1", "code": "152",
                              "userId": 18, "externalPhone": "+74950000000"}
        # download: the call again with its recording; RetailCRM calls it a duplicate, which is success.
        assert uploads[1]["recordUrl"] == "https://rec.example/c1.mp3"
        logged = scalar(db_url, "SELECT string_agg(concat_ws(' ', error, request_excerpt, response_excerpt), ' ') "
                                "FROM dispatch.integration_logs")
        assert "duplicateCalls" in logged and API_KEY not in logged
        with psycopg.connect(db_url) as conn:
            status = conn.execute("SELECT enabled, last_success_at IS NOT NULL, last_error, breaker "
                                  "FROM dispatch.integration_status").fetchall()
        assert status == [(True, True, None, "closed")]


async def test_each_refusal_stops_or_retries_with_the_crms_own_words(db_url: str) -> None:
    async with fake_retailcrm() as fake:
        for account in ("off", "html", "bad", "busy", "proxy"):
            enterprise(db_url, account, retailcrm=retailcrm(fake, account))
        enterprise(db_url, "key", retailcrm={**retailcrm(fake, "ok"), "api_key": "wrong-key"})
        enterprise(db_url, "refused", retailcrm={**retailcrm(fake, "ok"), "api_url": "http://127.0.0.1:9"})
        enterprise(db_url, "payload", retailcrm=retailcrm(fake, "ok"))
        enterprise(db_url, "disabled", retailcrm=retailcrm(fake, "ok"))
        for number in ("off", "html", "bad", "busy", "proxy", "key", "refused", "disabled"):
            call_event(db_url, number, "dial", f"call-{number}", phone=PHONE)
        call_event(db_url, "payload", "hangup", "call-p", phone=PHONE, status="hung")
        call_event(db_url, "payload", "download", "call-p", phone=PHONE)
        # Switched off after the event was queued: honoured when the attempt starts.
        execute(db_url, "UPDATE dispatch.enterprises SET integrations_config = "
                        "jsonb_set(integrations_config, '{retailcrm,enabled}', 'false') WHERE number = 'disabled'")
        await drain(db_url)
        assert outcomes(db_url) == {
            "off": [("dead", "RetailCRM answered 200: Telephony is not enabled")],
            "html": [("dead", "RetailCRM answered 404 with an HTML page: the account does not exist (check api_url)")],
            "bad": [("dead", "RetailCRM answered 400: Errors in the entity format "
                             "(phone: This value should not be blank.)")],
            "busy": [("retried", "RetailCRM rate limit (503): Rate limit exceeded"), ("completed", None)],
            "proxy": [("retried", "RetailCRM answered 502 with no JSON"), ("completed", None)],
            "key": [("dead", 'RetailCRM answered 403: Wrong "apiKey" value.')],
            "refused": [("retried", "127.0.0.1:9: ConnectError: connection refused")] * 2
                       + [("dead", "127.0.0.1:9: ConnectError: connection refused")],
            "payload": [("dead", "a download event needs payload.record_url"),
                        ("dead", "payload.status must be one of answered, busy, cancel, failed, no_answer, "
                                 "got 'hung'")],
            "disabled": [("dead", "retailcrm is not enabled for enterprise disabled")],
        }
        assert not fake.to("telephony/call/event", "disabled") and not fake.to("telephony/call/event", "payload")
        # Retry-After paused the enterprise's key for every worker: its retry came after it.
        busy = [s.at for s in fake.seen if s.account == "busy"]
        assert busy[1] - busy[0] >= 0.9
        errors = scalar(db_url, "SELECT count(*) FROM dispatch.integration_status WHERE last_error IS NOT NULL")
        assert errors == 9  # busy and proxy: their retries


async def test_the_webhook_crm_gets_signed_events_with_one_id_per_call_and_event(db_url: str) -> None:
    from aiohttp import web

    from tests.helpers import served

    received: list[tuple[dict[str, str], bytes]] = []
    answers = iter([503, 200, 200])

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=next(answers))

    async with served(hook) as url, fake_retailcrm() as fake:
        enterprise(db_url, "0367", retailcrm=retailcrm(fake, "ok"),
                   webhook={"enabled": True, "url": f"{url}/calls", "secret": SECRET})
        with psycopg.connect(db_url, autocommit=True) as conn:
            rows = conn.execute("SELECT integration, created FROM dispatch.call_event('0367', 'dial', 'c9', %s)",
                                (json.dumps({"phone": PHONE}),)).fetchall()
        assert rows == [("retailcrm", True), ("webhook", True)]
        call_event(db_url, "0367", "hangup", "c9", phone=PHONE, status="answered", duration=30)
        await drain(db_url)
    assert len(received) == 3 and len(fake.seen) == 3  # dial, hangup event, hangup upload
    ids = [headers["webhook-id"] for headers, _ in received]
    # The same id on the retry; a retried event may arrive after a later one (no order is promised).
    assert sorted(ids) == ["call-c9-dial", "call-c9-dial", "call-c9-hangup"]
    dials = [body for headers, body in received if headers["webhook-id"] == "call-c9-dial"]
    assert dials[0] == dials[1]  # the retry sends the same body, timestamp included
    events = {e["type"]: e for e in (Webhook(SECRET).verify(body, headers) for headers, body in received)}
    assert events["call.dial"]["data"] == {"enterprise": "0367", "call_unique_id": "c9", "phone": PHONE}
    assert events["call.hangup"]["data"] == {"enterprise": "0367", "call_unique_id": "c9", "phone": PHONE,
                                 "status": "answered", "duration": 30}


async def test_the_breaker_of_an_enterprises_crm_opens_and_a_probe_closes_it(db_url: str) -> None:
    async with fake_retailcrm() as fake:
        enterprise(db_url, "0367", retailcrm=retailcrm(fake, "down"))
        enterprise(db_url, "0368", retailcrm=retailcrm(fake, "ok"))
        for i in range(6):
            call_event(db_url, "0367", "dial", f"d{i}", phone=PHONE)
        call_event(db_url, "0368", "dial", "healthy", phone=PHONE)

        def breaker(number: str) -> str:
            return str(scalar(db_url, "SELECT breaker FROM dispatch.integration_status WHERE enterprise = %s",
                              (number,)))

        async with worker_context(db_url, breaker_failures=3, breaker_cooldown=1.0) as context, \
                running_worker(db_url, builtin_executors(context), queues=("crm",), concurrency=1):
            await wait_until(lambda: breaker("0367") == "open")
            failures = len(fake.to("telephony/call/event", "down"))
            assert failures == 3  # then nothing is sent while it is open
            reason = scalar(db_url, "SELECT breaker_reason FROM dispatch.integration_status "
                                    "WHERE enterprise = '0367'")
            assert "after 3 consecutive failures (answered 500)" in reason
            # Another enterprise's CRM is not held back.
            await wait_until(lambda: fake.to("telephony/call/event", "ok"))
            fake.down = False  # the CRM recovers: after the cooldown, one probe closes it
            await wait_until(lambda: breaker("0367") == "closed", timeout=20)
            await wait_until(lambda: not scalar(db_url, "SELECT count(*) FROM dispatch.jobs"), timeout=20)
        assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs") == 0
        sent = len(fake.to("telephony/call/event", "down"))
        assert sent == 3 + 6  # three failures, then each event once


def test_crm_cli(db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Any) -> None:
    """Every command's happy and error paths, exit codes, and the API key in no output."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    # With DATABASE_URL the checks keep the workers' policy: the fake on loopback is allowed by name.
    monkeypatch.setenv("PGDISPATCH_ALLOW_DESTINATIONS", "127.0.0.1")
    with in_a_thread(fake_retailcrm()) as fake:
        settings = tmp_path / "retailcrm.json"
        settings.write_text(json.dumps({"api_url": fake.api_url("ok"), "api_key": API_KEY}))
        for argv, code, expect in [
            (("crm", "config", "set", "0367", "retailcrm", "--settings", f"@{settings}", "--enable",
              "--name", "Acme"), 0, "enterprise 0367: retailcrm enabled, api_key, api_url, enabled set"),
            (("crm", "config", "set", "0367", "retailcrm", "--settings", '{"user_mappings": {"151": 16}}'), 0,
             "retailcrm enabled, user_mappings set"),
            (("crm", "config", "set", "0367", "retailcrm", "--settings", '{"api_url": "nope"}'), 2,
             "enterprise 0367: retailcrm.api_url must be the account URL"),
            (("crm", "config", "set", "0367", "bitrix", "--enable"), 2, "bitrix: unknown integration"),
            (("crm", "config", "set", "0367", "webhook", "--settings", '{"url": "https://hooks.example/calls"}'), 0,
             "webhook disabled, url set"),  # a new integration starts disabled
            (("crm", "config", "set", "0367", "retailcrm"), 2, "nothing to set: give --settings"),
            (("crm", "config", "set", "0368", "retailcrm", "--settings", "{oops"), 2, "--settings is not valid JSON"),
            (("crm", "config", "get", "0367"), 0, '"api_key": "***"'),
            (("crm", "config", "get", "0404"), 3, "no enterprise 0404"),
            (("crm", "config", "test", "0367"), 0, "enterprise 0367 retailcrm: ok, RetailCRM answered 200"),
            (("crm", "config", "set", "0369", "retailcrm", "--settings",
              json.dumps({"api_url": fake.api_url("html"), "api_key": API_KEY, "enabled": True})), 0, "enabled"),
            (("crm", "config", "test", "0369"), 1, "enterprise 0369 retailcrm: RetailCRM answered 404 with an HTML "
                                                   "page: the account does not exist"),
            (("crm", "config", "test", "0369", "webhook"), 3, "enterprise 0369 has no webhook config"),
            (("crm", "config", "test", "0404"), 3, "no enterprise 0404"),
            (("crm", "event", "0367", "dial", "c1", "--payload", '{"phone": "+79990001122"}'), 0, "retailcrm"),
            (("crm", "event", "0367", "ring", "c1"), 2, "invalid choice: 'ring'"),
            (("crm", "event", "0404", "dial", "c1"), 3, "no enterprise 0404"),
            (("crm", "status"), 0, "0367"),
            (("crm", "status", "0367", "--json"), 0, '"breaker": "closed"'),
        ]:
            got, output = run_cli(capsys, *argv)
            assert (got, expect in output) == (code, True), (argv, got, output)
            if got:  # a refusal is one line
                assert len(output.strip().splitlines()) == 1, (argv, output)
            assert API_KEY not in output, argv
        assert [s.method for s in fake.seen] == ["credentials", "credentials"]


async def test_two_worker_processes_share_the_enterprises_rate_limit_and_serve_smart_redirect(
        db_url: str, tmp_path: Any) -> None:
    """A real pool (`pgdispatch worker --processes 2 --http-port`): the enterprise's rate limit
    holds across both processes (the rate RetailCRM sees is within 10% of it), and the pool's
    HTTP port answers smart redirects and reports the CRMs and the config caches."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with fake_retailcrm() as fake:
        enterprise(db_url, "0367", retailcrm=retailcrm(fake, "ok", user_mappings={"151": 16}))
        execute(db_url, "UPDATE dispatch.limits SET rate = 10, burst = 1, concurrency = 5 "
                        "WHERE key = 'tenant:enterprise:0367:retailcrm'")
        log = (tmp_path / "pool.log").open("w")
        pool = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgdispatch", "worker", "--queue", "crm", "--processes", "2", "--concurrency", "20",
            "--allow-destination", "127.0.0.1",
            "--http-port", str(port), env={**os.environ, "DATABASE_URL": db_url, "PGDISPATCH_LOG": "WARNING"},
            stdout=log, stderr=subprocess.STDOUT)
        try:
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.worker_status "
                                                    "WHERE status = 'alive'") == 2, timeout=30)
            with psycopg.connect(db_url) as conn:  # one commit: both processes find work at once
                for i in range(80):
                    conn.execute("SELECT dispatch.call_event('0367', 'dial', %s, %s)",
                                 (f"r{i}", json.dumps({"phone": PHONE})))
            await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.job_history "
                                                    "WHERE outcome = 'completed'") == 80, timeout=60)
            times = sorted(s.at for s in fake.to("telephony/call/event"))
            rate = (len(times) - 1) / (times[-1] - times[0])
            print(f"rate at RetailCRM across 2 processes: {rate:.2f}/s (limit 10/s)")
            assert len(times) == 80 and 9.0 <= rate <= 11.0, rate  # RetailCRM's 10/s per key
            assert scalar(db_url, "SELECT count(DISTINCT worker) FROM dispatch.job_history") == 2
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                async def redirect() -> dict[str, Any]:
                    response = await client.get("/smart-redirect", params={"enterprise": "0367", "phone": PHONE})
                    assert response.status_code == 200
                    return dict(response.json())

                answer = await redirect()
                while answer.get("reason") == "smart redirect is starting":  # its connections are opening
                    await asyncio.sleep(0.05)
                    answer = await redirect()
                assert answer["redirect"] is True and answer["extension"] == "151"
                bad = await client.get("/smart-redirect", params={"enterprise": "0367"})
                assert bad.status_code == 400 and "phone must be" in bad.json()["error"]
                stats = (await client.get("/stats")).json()
                assert [(i["enterprise"], i["breaker"]) for i in stats["integrations"]] == [("0367", "closed")]
                assert stats["smart_redirect"]["redirected"] == 1
                assert all("integration_config_cache" in w["stats"] for w in stats["workers"])
                metrics = (await client.get("/metrics")).text
                assert 'pgdispatch_smart_redirect_total{result="redirected"} 1.0' in metrics
                assert 'pgdispatch_crm_breaker_open{enterprise="0367",integration="retailcrm"} 0.0' in metrics
                assert API_KEY not in json.dumps(stats) and API_KEY not in metrics
        finally:
            pool.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(pool.wait(), 60) == 0, (tmp_path / "pool.log").read_text()
            log.close()
