"""Channels under review (issue 20, items 1, 2 and 6-10), against a real PostgreSQL and local
servers that answer like the vendors. Each test says how it failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from pgdispatch.worker.channels import ADAPTERS, CRM_ADAPTERS, CallEvent, Delivery
from pgdispatch.worker.channels.retailcrm import check_retailcrm
from pgdispatch.worker.executors.context import ExecutorContext, executor_context
from pgdispatch.worker.executors.http_request import HttpRequestExecutor
from pgdispatch.worker.executors.lead_delivery import DeliveryIO
from pgdispatch.worker.executors.outbound_io import LimitedIO
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outcome import Discard, Done, Outcome, Retry
from tests.fake_channels import BOT_TOKEN, fake_channels
from tests.fake_retailcrm import API_KEY, fake_retailcrm
from tests.helpers import execute, scalar, wait_until
from tests.test_leads import Mailbox, credential
from tests.test_limits_review import claim_one

# Every way of writing an address the policy forbids: loopback by IPv4, "every address",
# link-local (a cloud's metadata service), IPv6, IPv4-mapped IPv6, with userinfo, rooted, a
# name that resolves to loopback, and the same address as one decimal number.
FORMS = ["127.0.0.1", "0.0.0.0", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]", "x@127.0.0.1",
         "127.0.0.1.", "localhost", "2130706433"]


@contextlib.asynccontextmanager
async def context(db_url: str, *, allowed: tuple[str, ...] = ()) -> AsyncIterator[ExecutorContext]:
    """A worker's outbound context with the policy of a worker started with DATABASE_URL."""
    async with executor_context(db_url, destinations=Destinations(allow_private=False, allowed=allowed),
                                max_connections=10) as ctx:
        yield ctx


def delivery(type_: str, settings: dict[str, Any], credential_id: int = 1) -> Delivery:
    return Delivery(delivery_id=1, credential_id=credential_id, type=type_, settings=settings, lead_id=1,
                    external_entity_id=1, external_project_id=None, data={"name": "Ann", "phone": "+1"},
                    created_at=datetime.now(UTC))


def lead_settings(type_: str, base: str) -> dict[str, Any]:
    return {"webhooks": {"url": f"{base}/hook/200"},
            "telegram": {"bot_token": BOT_TOKEN, "chat_id": 1001, "base_url": base},
            "bitrix24": {"webhook_url": f"{base}/rest/1/okcode/"},
            "amocrm": {"base_url": f"{base}/amo/acme", "long_lived_token": "at-0"}}[type_]


def refused(outcome: Outcome) -> bool:
    return isinstance(outcome, Discard) and "may not reach" in (outcome.error or "")


# -- 1. one destination policy on every outbound path ---------------------------------------------

@pytest.mark.parametrize("form", FORMS)
async def test_no_channel_reaches_a_private_address_however_it_is_written(db_url: str, form: str) -> None:
    # Before: with default workers a webhook `url`, a Telegram `base_url`, a Bitrix24
    # `webhook_url` or a RetailCRM `api_url` on 127.0.0.1 (or 169.254.169.254, 0.0.0.0,
    # [::ffff:127.0.0.1], x@127.0.0.1) was reached: the shared send path never checked the policy
    # and aiohttp skips the checking resolver for IP literals. Only send_request was refused.
    async with fake_channels() as fake:
        port = fake.url.rsplit(":", 1)[1]
        base = f"http://{form}:{port}"
        outcomes: dict[str, Outcome] = {}
        async with context(db_url) as ctx:
            for type_ in ("webhooks", "telegram", "bitrix24", "amocrm"):
                outcomes[type_] = await _sent(ADAPTERS[type_](delivery(type_, lead_settings(type_, base)),
                                                              DeliveryIO(ctx, 1, [f"credential:{type_}"])))
            crm = {"retailcrm": {"api_url": f"{base}/acme", "api_key": API_KEY},
                   "webhook": {"url": f"{base}/hook/200"}}
            for name, settings in crm.items():
                call = CallEvent(enterprise="0367", integration=name, event="dial", call_unique_id="c1",
                                 payload={"phone": "+1"}, sent_at=datetime.now(UTC), settings=settings)
                outcomes[name] = await _sent(CRM_ADAPTERS[name](call, LimitedIO(ctx, f"enterprise:0367:{name}",
                                                                                timeout=3)))
            execute(db_url, "SELECT dispatch.send_request('POST', %s)", (f"{base}/x",))
            outcomes["http.request"] = await HttpRequestExecutor(ctx)(await claim_one(db_url))
        assert {name: refused(o) for name, o in outcomes.items()} == dict.fromkeys(outcomes, True), outcomes
        assert fake.seen == []  # nothing reached the server
    # The same server is reachable when the address is allowed: the refusals above are the policy's.
    async with fake_channels() as fake, context(db_url, allowed=("127.0.0.1",)) as ctx:
        done = await ADAPTERS["webhooks"](delivery("webhooks", lead_settings("webhooks", fake.url)),
                                          DeliveryIO(ctx, 1, ["credential:1"]))
        assert isinstance(done, Done) and len(fake.seen) == 1


async def _sent(coro: Any) -> Outcome:
    from pgdispatch.worker.channels.delivery import NotSent

    try:
        return await coro  # type: ignore[no-any-return]
    except NotSent as not_sent:
        return not_sent.outcome


# -- 2. e-mail connects to the address it checked ----------------------------------------------------

def smtp_server() -> tuple[Any, int, Mailbox]:
    from aiosmtpd.controller import Controller

    mailbox = Mailbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, port, mailbox


async def test_email_connects_to_the_address_it_checked_and_checks_ipv6_too(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: email.py resolved and checked the SMTP host (IPv4 only), then aiosmtplib resolved it
    # again and connected wherever that second answer pointed (DNS rebinding).
    answers = {"rebinds.test": [["127.0.0.1"], ["127.0.0.3"]], "v6only.test": [["::1"]]}
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(name)
        addresses = answers[name][min(len(asked) - 1, len(answers[name]) - 1)] if name == "rebinds.test" \
            else answers[name][0]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, int(port or 0), 0, 0) if ":" in a else (a, int(port or 0))) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    controller, port, mailbox = smtp_server()
    try:
        smtp = {"port": port, "security": "plain", "from": "leads@example.com", "to": ["sales@example.com"]}
        async with context(db_url, allowed=("127.0.0.1",)) as ctx:
            sent = await ADAPTERS["email"](delivery("email", {**smtp, "host": "rebinds.test"}),
                                           DeliveryIO(ctx, 1, ["credential:1"]))
            assert isinstance(sent, Done), sent
            assert asked == ["rebinds.test"] and len(mailbox.messages) == 1  # resolved once, delivered there
            v6 = await ADAPTERS["email"](delivery("email", {**smtp, "host": "v6only.test"}),
                                         DeliveryIO(ctx, 1, ["credential:1"]))
            assert refused(v6), v6
    finally:
        controller.stop()


# -- 6. amoCRM's rotated refresh token is never lost ---------------------------------------------------

async def test_a_refresh_token_rotated_by_amocrm_is_stored_even_when_the_job_is_cancelled(db_url: str) -> None:
    # Before: the OAuth call ran inside the transaction holding the credential's row lock;
    # amoCRM voids the old refresh token as soon as it answers, so a cancellation before COMMIT
    # left a dead credential. And the call held a pool connection (in a transaction) meanwhile.
    async with fake_channels() as fake, context(db_url, allowed=("127.0.0.1",)) as ctx:
        with psycopg.connect(db_url, autocommit=True) as conn:
            cid = credential(conn, "amocrm", {"base_url": f"{fake.url}/amo/acme", "client_id": "c",
                                              "client_secret": "s", "redirect_uri": "https://x/oauth",
                                              "refresh_token": "rt-0"})
        in_transaction: list[int] = []
        sending: asyncio.Task[Outcome] | None = None

        async def answered() -> None:  # amoCRM has rotated the tokens: cancel the job now
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
                row = await (await c.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%'")).fetchone()
            in_transaction.append(int(row[0]) if row else -1)
            assert sending is not None
            asyncio.get_running_loop().call_soon(sending.cancel)

        fake.on_refresh = answered
        settings = psycopg.connect(db_url).execute("SELECT settings FROM dispatch.credentials WHERE id = %s",
                                                   (cid,)).fetchone()[0]  # type: ignore[index]
        sending = asyncio.create_task(_sent(ADAPTERS["amocrm"](delivery("amocrm", settings, cid),
                                                               DeliveryIO(ctx, cid, [f"credential:{cid}"]))))
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        assert sending.cancelled()
        assert in_transaction == [0]  # no connection held across the vendor's call
        # The refresh went on without the job: the new pair is stored and the lease given back.
        await wait_until(lambda: scalar(db_url, "SELECT refresh_holder IS NULL AND settings ->> 'refresh_token' = 'rt-1' "
                                                "FROM dispatch.credentials WHERE id = %s", (cid,)), 10)
        assert fake.amo["acme"].refresh_token == "rt-1"


async def test_a_refreshed_token_is_stored_even_when_the_database_connections_drop_as_amocrm_answers(
        db_url: str) -> None:
    # Before: the new pair was written once; a connection lost at that moment (a PostgreSQL
    # restart, a pooler dropping it) lost the rotated refresh token that amoCRM had already
    # voided the old one for. Here every connection of the worker is terminated as amoCRM answers.
    async with fake_channels() as fake, context(db_url, allowed=("127.0.0.1",)) as ctx:
        with psycopg.connect(db_url, autocommit=True) as conn:
            cid = credential(conn, "amocrm", {"base_url": f"{fake.url}/amo/acme", "client_id": "c",
                                              "client_secret": "s", "redirect_uri": "https://x/oauth",
                                              "refresh_token": "rt-0"})
        terminated: list[int] = []

        async def answered() -> None:
            async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as c:
                cur = await c.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                row = await cur.fetchone()
            terminated.append(int(row[0]) if row else 0)

        fake.on_refresh = answered
        settings = psycopg.connect(db_url).execute("SELECT settings FROM dispatch.credentials WHERE id = %s",
                                                   (cid,)).fetchone()[0]  # type: ignore[index]
        outcome = await ADAPTERS["amocrm"](delivery("amocrm", settings, cid),
                                           DeliveryIO(ctx, cid, [f"credential:{cid}"]))
        assert terminated and terminated[0] >= 1  # the fault hit the worker's idle pool connections
        assert isinstance(outcome, Done), outcome
        assert scalar(db_url, "SELECT settings ->> 'refresh_token' FROM dispatch.credentials WHERE id = %s",
                      (cid,)) == fake.amo["acme"].refresh_token == "rt-1"


# -- 7. vendor limits keyed as the vendor keeps them; a vendor's retry answer is a pause -------------

async def test_two_credentials_of_one_bot_share_its_limit_and_a_429_pauses_it_without_opening_a_breaker(
        db_url: str) -> None:
    # Before: the limit was per credential (tenant:credential:ID): two credentials with one bot
    # token sent 58 messages in a second; each 429 counted as a breaker failure and both circuits
    # opened for 30 s although Telegram asked for `retry_after: 1`.
    async with fake_channels() as fake:
        with psycopg.connect(db_url, autocommit=True) as conn:
            a = credential(conn, "telegram", {"bot_token": BOT_TOKEN, "chat_id": 1001, "base_url": fake.url})
            b = credential(conn, "telegram", {"bot_token": BOT_TOKEN, "chat_id": 1002, "base_url": fake.url})
            scopes = dict(conn.execute("SELECT id, dispatch.credential_limit_scopes(id, type, settings) "
                                       "FROM dispatch.credentials").fetchall())
            rules = dict(conn.execute("SELECT key, rate FROM dispatch.limits").fetchall())
        assert scopes[a][0] == scopes[b][0] and scopes[a][0].startswith("telegram-bot:")  # one bot, one key
        assert BOT_TOKEN not in json.dumps(scopes)  # the token itself is no key
        assert rules[f"tenant:{scopes[a][0]}"] == 25.0 and rules[f"tenant:{scopes[a][1]}"] == 1.0
        assert scopes[a][1] != scopes[b][1]  # each chat its own
        async with context(db_url, allowed=("127.0.0.1",)) as ctx:
            await ctx.limits.reload()
            for _ in range(4):  # chat 1002 answers 429 retry_after 0 once; the bot is paused each time
                fake.calls.pop("chat:1002", None)
                outcome = await ADAPTERS["telegram"](delivery("telegram", {"bot_token": BOT_TOKEN, "chat_id": 1002,
                                                                          "base_url": fake.url}, b),
                                                     DeliveryIO(ctx, b, scopes[b]))
                assert isinstance(outcome, Retry)
            assert ctx.limits.counters.breakers_opened == 0
        assert scalar(db_url, "SELECT count(*) FROM dispatch.limit_state WHERE open_until IS NOT NULL") == 0


async def test_bitrix24s_query_limit_exceeded_pauses_the_portal_and_opens_no_breaker(db_url: str) -> None:
    # Before: Bitrix24's "too many" (503 QUERY_LIMIT_EXCEEDED, its bucket of 50 full) counted as a
    # breaker failure: with the portal's breaker at one failure it opened for its cooldown.
    async with fake_channels() as fake:
        settings = {"webhook_url": f"{fake.url}/rest/1/busycode/"}
        with psycopg.connect(db_url, autocommit=True) as conn:
            cid = credential(conn, "bitrix24", settings)
            scopes = conn.execute("SELECT dispatch.credential_limit_scopes(id, type, settings) "
                                  "FROM dispatch.credentials WHERE id = %s", (cid,)).fetchone()[0]  # type: ignore[index]
            conn.execute("UPDATE dispatch.limits SET breaker_failures = 1 WHERE key = %s", (f"tenant:{scopes[0]}",))
        async with context(db_url, allowed=("127.0.0.1",)) as ctx:
            await ctx.limits.reload()
            outcome = await ADAPTERS["bitrix24"](delivery("bitrix24", settings, cid), DeliveryIO(ctx, cid, scopes))
            assert isinstance(outcome, Retry) and "QUERY_LIMIT_EXCEEDED" in (outcome.error or "")
            assert ctx.limits.counters.breakers_opened == 0
        assert scalar(db_url, "SELECT count(*) FROM dispatch.limit_state WHERE open_until IS NOT NULL") == 0
        assert scalar(db_url, "SELECT count(*) FROM dispatch.limit_state WHERE key LIKE 'tenant:bitrix24:%%' "
                              "AND paused_until > now()") == 1


# -- 8. RetailCRM's connection test asks /api/credentials ---------------------------------------------

async def test_the_retailcrm_check_asks_the_unversioned_credentials_endpoint(db_url: str) -> None:
    # Before: `crm config test` asked /api/v5/credentials, a 404: a working account reported broken.
    async with fake_retailcrm() as fake, context(db_url, allowed=("127.0.0.1",)) as ctx:
        said = await check_retailcrm({"api_url": fake.api_url("ok"), "api_key": API_KEY},
                                     LimitedIO(ctx, "enterprise:1:retailcrm", timeout=3))
        assert said.startswith("RetailCRM answered 200: the key works")
        assert [s.method for s in fake.seen] == ["credentials"]


# -- 9. a retried hangup does not repeat its call event ----------------------------------------------

async def test_a_hangup_whose_upload_failed_once_sends_only_the_upload_again(db_url: str) -> None:
    # Before: the retry sent the hangup event again, then the upload.
    from tests.test_crm_delivery import drain as crm_drain
    from tests.test_crm_delivery import enterprise, retailcrm

    async with fake_retailcrm() as fake:
        enterprise(db_url, "0367", retailcrm=retailcrm(fake, "flaky-upload"))
        execute(db_url, "SELECT dispatch.call_event('0367', 'hangup', 'c1', %s)",
                (json.dumps({"phone": "+79990001122", "extension": "151", "status": "answered"}),))
        await crm_drain(db_url)
        methods = [s.method for s in fake.seen]
    assert methods == ["telephony/call/event", "telephony/calls/upload", "telephony/calls/upload"]
    assert scalar(db_url, "SELECT outcome FROM dispatch.job_history ORDER BY finished_at DESC LIMIT 1") == "completed"


# -- 10. operators' reads run without JIT --------------------------------------------------------------

async def test_stats_reads_run_with_jit_off_for_their_transaction(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: /stats spent 1.8-3.3 s per call compiling integration_status with JIT; the same
    # query with JIT off takes 0.5 ms. The setting is the transaction's only (pooler-safe).
    from pgdispatch import sql
    from pgdispatch.worker import ops_http

    asked: list[str] = []
    real = sql.query

    def query(name: str) -> str:
        asked.append(name)
        return real(name)

    monkeypatch.setattr(ops_http.sql, "query", query)
    execute(db_url, f"ALTER DATABASE {psycopg.conninfo.conninfo_to_dict(db_url)['dbname']} SET jit_above_cost = 0")
    stats = await ops_http.read_stats(db_url)
    assert asked[0] == "operator_reads" and "integration_status" in asked
    assert "queues" in stats
    with psycopg.connect(db_url) as conn:
        conn.execute(real("operator_reads"))
        assert conn.execute("SHOW jit").fetchone() == ("off",)
        conn.rollback()
        assert conn.execute("SHOW jit").fetchone() == ("on",)  # nothing left behind
