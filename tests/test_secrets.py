"""One masking of every channel's secrets (issue 20, items 3-5): planted in every channel's
settings, an enterprise's CRMs, a process's journal and a remote's error, then searched for in
every relation the read-only role can read, every CLI output and every log line. Before: a
reader and `credentials list --json` saw the Bitrix24 inbound-webhook code, a hook's path token
and a custom auth header's value; a payload over 16 KB was cut before it was masked; step
messages were never masked; `"tokens": [...]` was not masked; an error quoting a URL with its key
reached job_list, dead_job_list and recent_failures."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import psycopg
import pytest

import pgdispatch
from pgdispatch.db.connections import DIRECT, guarded, open_pool
from pgdispatch.db.masking import mask_document, mask_text
from pgdispatch.worker.channels.secrets import CREDENTIALS, CRMS
from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors import builtin_executors
from pgdispatch.worker.executors.context import executor_context
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.runner import Runner
from tests.fake_channels import BOT_TOKEN, fake_channels
from tests.fake_retailcrm import API_KEY, fake_retailcrm
from tests.helpers import run_cli, scalar, wait_until
from tests.test_engine_review import login
from tests.test_leads import credential

HOOK_SECRET = base64.b64encode(b"PLANTED webhook signing secret").decode()
CRM_SECRET = base64.b64encode(b"PLANTED crm webhook signing sec").decode()
PLANTED = {
    "telegram bot token": BOT_TOKEN,
    "webhook path token": "PLANTEDhookPATHtoken",
    "webhook signing secret": HOOK_SECRET,
    "webhook auth header": "PLANTED-hook-header-value",
    "bitrix24 webhook code": "PLANTEDbitrixCODE123",
    "amocrm client secret": "PLANTED-amo-client-secret",
    "amocrm refresh token": "PLANTED-amo-refresh-token",
    "amocrm long-lived token": "PLANTED-amo-long-lived",
    "smtp password": "PLANTED-smtp-password",
    "retailcrm api key": API_KEY,
    "crm webhook path token": "PLANTEDcrmHOOKtoken",
    "crm webhook secret": CRM_SECRET,
    "crm webhook header": "PLANTED-crm-header-value",
    "process payload password": "PLANTED-process-password",
    "process message key": "PLANTED-message-api-key",
    "process token in a list": "PLANTED-token-in-a-list",
    "request query key": "PLANTED-query-api-key",
    "process state token": "PLANTED-process-state-token",
}

app = pgdispatch.App()


@app.process("leaky", "LEAKY", version=1, max_attempts=1)
class Leaky:
    steps = ["talk"]

    async def talk(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone(
            f"called https://api.example/x?api_key={PLANTED['process message key']}",
            payload={"password": PLANTED["process payload password"], "tokens": [PLANTED["process token in a list"]],
                     "big": "x" * 20_000})


# -- the masking, the same in Python and in SQL ------------------------------------------------------

SAMPLES: list[Any] = [
    {"password": "p", "tokens": ["t1", "t2"], "auth": {"token": "x"}, "n": 1, "url": "https://u:pw@h/x?api_key=k&a=1"},
    ["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "plain", "https://h/x?token=t"],
    {"nested": [{"Authorization": "Bearer x"}, {"cookie": ["a", "b"]}], "ok": "https://h/path"},
]
TEXTS = ['{"password": "pw", "x": 1} Bearer abc.def token xyz https://u:p@h/x?api_key=S&ok=1',
         "failed: url='http://127.0.0.1:9/x?api_key=SECRET123' eyJa.eyJb.c password=hunter2 <b>auth=x</b>"]


def test_python_and_sql_mask_alike(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    for doc in SAMPLES:
        assert conn.execute("SELECT dispatch.mask_secrets(%s)", (psycopg.types.json.Jsonb(doc),)).fetchone() == (
            mask_document(doc),)
    for text in TEXTS:
        assert conn.execute("SELECT dispatch.mask_text(%s)", (text,)).fetchone() == (mask_text(text),)
    assert "***" in mask_document(SAMPLES[0])["tokens"]  # a list under a secret-looking key, whole


def test_each_channel_declares_its_secrets_once_for_python_and_sql(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    declared = {(scope, type_, setting, kind)
                for scope, table in (("credential", CREDENTIALS), ("crm", CRMS))
                for type_, secrets in table.items()
                for kind, names in (("value", secrets.values), ("url_path", secrets.url_paths),
                                    ("headers", secrets.headers))
                for setting in names}
    assert set(conn.execute("SELECT scope, type, setting, kind FROM dispatch.secret_settings").fetchall()) == declared
    settings = {"url": "https://hooks.example/services/T0001/B0002/XXXX", "secret": "whsec_x",
                "headers": {"X-Auth": "v"}, "other": "kept"}
    masked = conn.execute("SELECT dispatch.mask_settings('credential', 'webhooks', %s)",
                          (psycopg.types.json.Jsonb(settings),)).fetchone()[0]  # type: ignore[index]
    assert masked == CREDENTIALS["webhooks"].mask(settings) == {
        "url": "https://hooks.example/***", "secret": "***", "headers": {"X-Auth": "***"}, "other": "kept"}


# -- the sweep ------------------------------------------------------------------------------------------

async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A remote whose answer is malformed: the client's error quotes the URL, keys included."""
    await reader.read(65536)
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    await writer.drain()
    writer.close()


def plant(db_url: str, hooks: str, retailcrm_url: str, remote: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        credential(conn, "telegram", {"bot_token": BOT_TOKEN, "chat_id": 1001, "base_url": hooks}, entity=10)
        credential(conn, "webhooks", {"url": f"{hooks}/hook/200/{PLANTED['webhook path token']}",
                                      "secret": f"whsec_{HOOK_SECRET}",
                                      "headers": {"X-Auth": PLANTED["webhook auth header"]}}, entity=10)
        credential(conn, "bitrix24", {"webhook_url": f"{hooks}/rest/1/{PLANTED['bitrix24 webhook code']}/"}, entity=10)
        credential(conn, "amocrm", {"base_url": f"{hooks}/amo/acme", "client_id": "c",
                                    "client_secret": PLANTED["amocrm client secret"], "redirect_uri": "https://x/o",
                                    "refresh_token": PLANTED["amocrm refresh token"]}, entity=10)
        credential(conn, "amocrm", {"base_url": f"{hooks}/amo/other", "long_lived_token": PLANTED["amocrm long-lived token"]},
                   entity=10)
        credential(conn, "email", {"host": "127.0.0.1", "port": 9, "security": "plain", "from": "a@b.example",
                                   "to": ["c@d.example"], "username": "u", "password": PLANTED["smtp password"]},
                   entity=10)
        conn.execute("INSERT INTO dispatch.leads (id, external_entity_id, data) VALUES (1, 10, '{\"name\": \"Ann\"}')")
        conn.execute("SELECT dispatch.send_lead(1)")
        conn.execute("INSERT INTO dispatch.enterprises (number, name, integrations_config) VALUES ('0367', 'Acme', %s)",
                     (json.dumps({"retailcrm": {"enabled": True, "api_url": retailcrm_url, "api_key": API_KEY},
                                  "webhook": {"enabled": True, "url": f"{hooks}/hook/500/{PLANTED['crm webhook path token']}",
                                              "secret": f"whsec_{CRM_SECRET}",
                                              "headers": {"X-Auth": PLANTED["crm webhook header"]}}}),))
        conn.execute("SELECT dispatch.call_event('0367', 'dial', 'c1', '{\"phone\": \"+79990001122\"}')")
        conn.execute("SELECT dispatch.send_request('POST', %s, attempt_limit => 1)",
                     (f"{remote}/x?api_key={PLANTED['request query key']}",))
        conn.execute("UPDATE dispatch.queues SET max_attempts = 1")


async def run_planted(db_url: str) -> None:
    """Every channel, CRM, process and request with its planted secrets, run once by a worker
    against local servers (failures included, so errors are stored)."""
    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    remote = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with fake_channels() as hooks, fake_retailcrm() as crm:
        plant(db_url, hooks.url, crm.api_url("ok"), remote)
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            await app.register(conn)
            await app.start_process(conn, "leaky", {"order": 1, "access_token": PLANTED["process state token"]})
            await conn.commit()
        async with executor_context(db_url, destinations=Destinations(allow_private=True),
                                    max_connections=20) as ctx:
            # The App's jobs run on a pool of their own, as in a worker.
            app_pool = open_pool(db_url, settings=DIRECT, name="app", min_size=1, max_size=2, autocommit=False)
            await app_pool.open()
            try:
                executors = {**builtin_executors(ctx), **app.executors(guarded(app_pool))}
                runner = Runner(WorkerConfig(database_url=db_url, drain=True, concurrency=20), executors)
                await asyncio.wait_for(runner.run(), 60)
            finally:
                await app_pool.close()
        await wait_until(lambda: scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0, 10)
    server.close()


def leaks_in(found: dict[str, list[str]], where: str, text: str) -> None:
    for name, secret in PLANTED.items():
        if secret in text:
            found.setdefault(name, []).append(where)


async def test_no_planted_secret_reaches_a_reader_the_cli_or_a_log(
        db_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    await run_planted(db_url)
    leaks: dict[str, list[str]] = {}

    def look(where: str, text: str) -> None:
        leaks_in(leaks, where, text)

    # Every relation the read-only role can read, whole.
    with login(db_url, "reader") as reader:
        relations = [r[0] for r in reader.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'dispatch' AND c.relkind IN ('r', 'v', 'p', 'm') "
            "AND has_table_privilege(c.oid, 'SELECT')").fetchall()]
        assert {"dispatch.credentials_masked", "dispatch.integration_logs", "dispatch.job_list"} <= set(relations)
        for relation in relations:
            rows = reader.execute(f"SELECT * FROM {relation} LIMIT 1000").fetchall()
            look(relation, json.dumps(rows, default=str))
    # Every CLI output, table and JSON.
    monkeypatch.setenv("DATABASE_URL", db_url)
    dead = [r[0] for r in psycopg.connect(db_url).execute("SELECT job_id FROM dispatch.dead_jobs").fetchall()]
    assert dead  # failures happened, so errors were stored
    commands = [("credentials", "list"), ("credentials", "list", "--json"), ("leads", "show", "1"),
                ("leads", "show", "1", "--json"), ("crm", "config", "get", "0367"), ("crm", "status"),
                ("crm", "status", "--json"), ("dead", "list"), ("dead", "list", "--json"), ("status", "--json"),
                ("process", "show", "1"), ("process", "show", "1", "--json"), ("limits", "list", "--json"),
                ("queues", "list", "--json")]
    commands += [(verb, "show", str(job), *json_) for job in dead for verb in ("dead", "request")
                 for json_ in ((), ("--json",))]
    for argv in commands:
        code, out = run_cli(capsys, *argv)
        assert code in (0, 3), (argv, code, out)
        look(" ".join(argv), out)
    # Every log line, at DEBUG.
    look("logs", caplog.text)
    assert leaks == {}
