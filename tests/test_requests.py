"""Outbound requests (seed 000) end to end, against a real local HTTP server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
import pytest
from aiohttp import web

from pgdispatch.worker.config import WorkerConfig
from pgdispatch.worker.executors import builtin_executors, http_request
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outbound.limits import Limits
from pgdispatch.worker.outbound.signing import SigningKeys
from pgdispatch.worker.outbound.transport import HttpTransport
from pgdispatch.worker.runner import Runner
from tests.helpers import execute, scalar, served, wait_until

SECRET = "hs-secret-DO-NOT-LEAK-8c1f-0123456789abcdef"
BEARER = "Bearer tok-DO-NOT-LEAK-77aa"


@dataclass
class Sink:
    """A real HTTP server on 127.0.0.1 that records what it receives."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.received if r["path"] == path]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    state = Sink()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.text()
        state.received.append({"path": request.path, "method": request.method, "body": body,
                               "headers": dict(request.headers)})
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            return await answer(request, body)
        finally:
            state.in_flight -= 1

    async def answer(request: web.Request, body: str) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "slow":
            await asyncio.sleep(5)
        if name == "lag":
            await asyncio.sleep(0.4)
        if name == "brief":  # long enough for requests to overlap
            await asyncio.sleep(0.01)
        if name == "busy":
            return web.Response(status=429, headers={"Retry-After": "7"}, text="slow down")
        if name == "big":
            return web.Response(status=500, text="x" * 100_000)
        if name.isdigit():
            return web.Response(status=int(name), text=f"answer {name}")
        return web.Response(status=200, text="ok")

    async with served(handle, "/{name}") as state.url:
        yield state


async def drain(db_url: str, *, allow_private_networks: bool = True, per_host_limit: int = 64,
                allowed: tuple[str, ...] = ()) -> Runner:
    keys = SigningKeys(db_url)
    destinations = Destinations(allow_private=allow_private_networks, allowed=allowed)
    async with HttpTransport(max_connections=100, destinations=destinations) as http, \
            Limits.open(db_url) as limits:
        runner = Runner(WorkerConfig(database_url=db_url, queues=("requests",), drain=True),
                        builtin_executors(ExecutorContext(http=http, keys=keys, per_host_limit=per_host_limit,
                                                          limits=limits,
                                                          destinations=destinations)))
        await asyncio.wait_for(runner.run(), 60)
    await keys.close()
    return runner


def send(db_url: str, uri: str, **kwargs: Any) -> int:
    names = ", ".join(f"{k} => %({k})s" for k in kwargs)
    query = f"SELECT dispatch.send_request(%(method)s, %(uri)s{', ' + names if names else ''})"
    params = {"method": kwargs.pop("method", "POST"), "uri": uri, **kwargs}
    if "method" in names:
        query = query.replace(", method => %(method)s", "")
    return int(scalar(db_url, query, params))


def job_row(db_url: str, job_id: int) -> tuple[Any, ...] | None:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT state::text, attempt, last_error, round(extract(epoch FROM run_at - now())) FROM dispatch.jobs WHERE id = %s", (job_id,)).fetchone()


def dead_row(db_url: str, job_id: int) -> tuple[Any, ...] | None:
    with psycopg.connect(db_url) as c:
        return c.execute("SELECT reason, last_status, attempt, last_error FROM dispatch.dead_jobs WHERE job_id = %s", (job_id,)).fetchone()


async def test_success_code_delivers_with_the_seed_body(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/202", method="patch", body="payload-1", success_code=202,
                  attempt_interval=10, expire_at=None)
    await drain(db_url)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
    (received,) = sink.received
    assert received["method"] == "PATCH" and received["headers"]["Content-Type"] == "application/json"
    body = json.loads(received["body"])
    created = scalar(db_url, "SELECT extract(epoch FROM now())::bigint")
    assert body["request"] == "payload-1"
    assert set(body) == {"request", "__task"} and set(body["__task"]) == {"createdAt", "attempt"}
    assert abs(body["__task"]["createdAt"] - created) < 60
    assert body["__task"]["attempt"] == {"number": 1, "limit": 1440, "interval": 10}
    with psycopg.connect(db_url) as c:
        attempt = c.execute("SELECT attempt, outcome, status, duration_ms >= 0, response_body FROM dispatch.request_attempts WHERE job_id = %s", (job_id,)).fetchone()
    assert attempt == (1, "completed", 202, True, "answer 202")


async def test_other_success_status_is_a_failure(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/200", success_code=202, attempt_interval=30)
    await drain(db_url)
    state, attempt, error, delay = job_row(db_url, job_id)  # type: ignore[misc]
    assert (state, attempt, error) == ("scheduled", 1, "HTTP 200 (expected 202)")
    assert 28 <= delay <= 30


async def test_listed_stop_code_and_418_stop_without_retry(db_url: str, sink: Sink) -> None:
    listed = send(db_url, f"{sink.url}/404", stop_codes=[404, 410])
    teapot = send(db_url, f"{sink.url}/418")
    await drain(db_url)
    assert dead_row(db_url, listed)[:3] == ("stop_code", 404, 1)  # type: ignore[index]
    assert dead_row(db_url, teapot)[:3] == ("stop_code", 418, 1)  # type: ignore[index]
    assert len(sink.received) == 2


async def test_expiry_between_attempts_is_dead_expired(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/500", expire_at=_in(db_url, 5), attempt_interval=60)
    await drain(db_url)
    assert dead_row(db_url, job_id)[:3] == ("expired", 500, 1)  # type: ignore[index]


async def test_expired_before_sending_sends_nothing(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/200", expire_at=_in(db_url, -1))  # expired in flight: accepted
    await drain(db_url)
    assert dead_row(db_url, job_id)[0] == "expired"  # type: ignore[index]
    assert sink.received == []


def _in(db_url: str, seconds: float) -> Any:
    return scalar(db_url, "SELECT now() + make_interval(secs => %s)", (seconds,))


async def test_attempt_limit_is_derived_from_expiry_or_1440(db_url: str) -> None:
    def stored(column: str, call: str) -> Any:
        job_id = scalar(db_url, f"SELECT dispatch.send_request({call})")
        return scalar(db_url, f"SELECT {column} FROM dispatch.jobs WHERE id = %s", (job_id,))

    assert stored("max_attempts", "'GET', 'https://a.example/x', expire_at => now() + interval '1 hour', attempt_interval => 60") == 60
    assert stored("max_attempts", "'GET', 'https://a.example/y', expire_at => now() + interval '95 seconds', attempt_interval => 10") == 10
    assert stored("max_attempts", "'GET', 'https://a.example/z'") == 1440
    assert stored("max_attempts", "'GET', 'https://a.example/w', attempt_limit => 3") == 3
    assert stored("args->'stop_codes'", "'GET', 'https://a.example/v', stop_codes => '{410, 404, 410}'") == [404, 410, 418]


async def test_attempt_limit_exhausts_into_dead_jobs(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/503", attempt_limit=2, attempt_interval=60)
    await drain(db_url)
    assert job_row(db_url, job_id)[:2] == ("scheduled", 1)  # type: ignore[index]
    execute(db_url, "UPDATE dispatch.jobs SET run_at = now()")  # the interval has passed
    await drain(db_url)
    assert dead_row(db_url, job_id)[:3] == ("exhausted", 503, 2)  # type: ignore[index]


async def test_retry_after_on_429_wins_over_the_interval(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/busy", attempt_interval=600)
    await drain(db_url)
    state, _, error, delay = job_row(db_url, job_id)  # type: ignore[misc]
    assert state == "scheduled" and "429" in error and 5 <= delay <= 7


async def test_timeout_is_a_retry_within_the_budget(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/slow", http_timeout=1, attempt_interval=60)
    started = asyncio.get_running_loop().time()
    await drain(db_url)
    assert asyncio.get_running_loop().time() - started < 4
    assert job_row(db_url, job_id)[2] == "timed out after 1s"  # type: ignore[index]
    assert scalar(db_url, "SELECT error_class FROM dispatch.request_attempts WHERE job_id = %s", (job_id,)) in ("TimeoutError", "ReadTimeout", "TimeoutException")


async def test_connection_refused_is_a_retry(db_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job_id = send(db_url, f"http://127.0.0.1:{port}/x", attempt_interval=5)
    await drain(db_url)
    state, attempt, error, _ = job_row(db_url, job_id)  # type: ignore[misc]
    assert (state, attempt) == ("scheduled", 1)
    assert error == "ConnectError: connection refused", error
    assert scalar(db_url, "SELECT error_class FROM dispatch.request_attempts WHERE job_id = %s", (job_id,)) == "ConnectError"


async def test_a_host_that_does_not_resolve_is_a_dns_error(db_url: str) -> None:
    job_id = send(db_url, "http://pgdispatch-test.invalid/x", attempt_interval=5)  # RFC 6761: never resolves
    await drain(db_url)
    state, attempt, error, _ = job_row(db_url, job_id)  # type: ignore[misc]
    assert (state, attempt, error) == ("scheduled", 1, "DNSError: could not resolve the host name")


async def test_big_response_keeps_only_an_excerpt(db_url: str, sink: Sink) -> None:
    job_id = send(db_url, f"{sink.url}/big")
    await drain(db_url)
    assert scalar(db_url, "SELECT length(response_body) FROM dispatch.request_attempts WHERE job_id = %s", (job_id,)) == 2048


async def test_jwt_signed_at_send_time_verifies_with_the_key(db_url: str, sink: Sink) -> None:
    execute(db_url, "INSERT INTO dispatch.signing_keys (name, algorithm, secret, ttl_seconds) VALUES ('crm', 'HS256', %s, 600)", (SECRET,))
    expire = _in(db_url, 120)
    job_id = send(db_url, f"{sink.url}/200", claims=json.dumps({"sub": "order-7"}), signing_key="crm",
                  expire_at=expire)
    await drain(db_url)
    token = sink.bodies("/200")[0]["request"]
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert decoded["sub"] == "order-7" and decoded["jti"] == str(job_id)
    assert decoded["exp"] <= int(expire.timestamp())  # capped by expire_at, not iat + 600
    assert decoded["exp"] - decoded["iat"] <= 121


async def test_rs256_and_es256_keys_sign_verifiable_jwts(db_url: str, sink: Sink) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    for name, private in (("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                          ("ec", ec.generate_private_key(ec.SECP256R1()))):
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        algorithm = "RS256" if name == "rsa" else "ES256"
        execute(db_url, "INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES (%s, %s, %s)", (name, algorithm, pem))
        send(db_url, f"{sink.url}/200", claims=json.dumps({"k": name}), signing_key=name)
        await drain(db_url)
        token = sink.bodies("/200")[-1]["request"]
        assert jwt.decode(token, private.public_key(), algorithms=[algorithm])["k"] == name


async def test_standard_webhooks_signature(db_url: str, sink: Sink) -> None:
    raw = b"0123456789abcdef0123456789abcdef"
    execute(db_url, "INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES ('wh', 'HS256', %s)", ("whsec_" + base64.b64encode(raw).decode(),))
    job_id = send(db_url, f"{sink.url}/200", body="hello", webhook_key="wh")
    await drain(db_url)
    (received,) = sink.received
    h = {k.lower(): v for k, v in received["headers"].items()}
    assert h["webhook-id"] == f"msg_{job_id}"
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.{received['body']}".encode()
    expected = base64.b64encode(hmac.new(raw, signed, hashlib.sha256).digest()).decode()
    assert h["webhook-signature"] == f"v1,{expected}"


async def test_idempotency_key_returns_the_same_request(db_url: str) -> None:
    first = send(db_url, "https://a.example/x", idempotency_key="cdr-1")
    assert send(db_url, "https://a.example/x", idempotency_key="cdr-1") == first
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 1


@pytest.mark.parametrize(("call", "message"), [
    ("SELECT dispatch.send_request('FETCH', 'https://a.example')", "method must be one of GET, POST, PUT, PATCH, DELETE, got 'FETCH'"),
    ("SELECT dispatch.send_request('GET', 'ftp://a.example')", "uri must be an absolute http(s) URL"),
    ("SELECT dispatch.send_request('GET', '/relative')", "uri must be an absolute http(s) URL"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', success_code => 999)", "success_code must be an HTTP status"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', stop_codes => '{1000}')", "stop_codes must be HTTP statuses (100-599), got 1000"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', attempt_interval => 0)", "attempt_interval must be >= 1"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', http_timeout => 0)", "http_timeout must be 1-3600"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', attempt_limit => 0)", "attempt_limit must be >= 1"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', claims => '{}', signing_key => 'nope')", "no signing key named 'nope'"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', claims => '{}')", "claims need a signing_key"),
    ("SELECT dispatch.send_request('GET', 'https://a.example', headers => '{\"X\": 1}')", "headers must be a JSON object"),
    ("INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES ('short', 'HS256', 'abc')", "signing_key_hs256_secret_at_least_32_bytes"),
    ("INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES ('k', 'none', 'abc')", "signing_key_algorithm_known"),
])
def test_send_request_refuses_bad_input_clearly(conn: psycopg.Connection[tuple[object, ...]], call: str, message: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(call)
    assert message in str(info.value)


async def test_hand_inserted_garbage_is_dead_invalid(db_url: str) -> None:
    execute(db_url, """INSERT INTO dispatch.jobs (queue, kind, args) VALUES
        ('requests', 'http.request', '{"method": "FETCH", "uri": "https://a.example"}'),
        ('requests', 'http.request', '{"method": "GET", "uri": "not a url"}'),
        ('requests', 'http.request', '{"method": "GET", "uri": "https://a.example", "success_code": "x"}'),
        ('requests', 'http.request', '{"method": "GET", "uri": "https://a.example", "claims": {"a": 1}, "signing_key": "ghost"}')""")
    await drain(db_url)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.dead_jobs WHERE reason = 'invalid'") == 4


async def test_secrets_never_reach_attempts_history_views_logs_or_cli_output(
        db_url: str, sink: Sink, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from pgdispatch.console import main as cli

    caplog.set_level(logging.DEBUG)
    execute(db_url, "INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES ('crm', 'HS256', %s)", (SECRET,))
    send(db_url, f"{sink.url}/500?api_token=qs-DO-NOT-LEAK", claims=json.dumps({"sub": "x"}),
         signing_key="crm", headers=json.dumps({"Authorization": BEARER}), attempt_limit=1)
    send(db_url, "http://user:pw-DO-NOT-LEAK@127.0.0.1:1/x?token=qs-DO-NOT-LEAK",
         headers=json.dumps({"Authorization": BEARER}))
    await drain(db_url)
    token = sink.bodies("/500")[0]["request"]
    assert sink.received[0]["headers"]["Authorization"] == BEARER  # it was really sent
    with psycopg.connect(db_url) as c:
        dumps = [json.dumps(c.execute(q).fetchall(), default=str) for q in (
            "SELECT * FROM dispatch.request_attempts", "SELECT * FROM dispatch.job_history",
            "SELECT * FROM dispatch.job_list", "SELECT * FROM dispatch.dead_job_list",
            "SELECT last_error FROM dispatch.jobs", "SELECT last_error FROM dispatch.dead_jobs")]
    monkeypatch.setenv("DATABASE_URL", db_url)
    ids = [r[0] for r in psycopg.connect(db_url).execute(
        "SELECT job_id FROM dispatch.dead_jobs UNION SELECT id FROM dispatch.jobs").fetchall()]
    assert len(ids) == 2
    dead = {r[0] for r in psycopg.connect(db_url).execute("SELECT job_id FROM dispatch.dead_jobs").fetchall()}
    for argv in (["status"], ["status", "--json"], ["dead", "list"], ["dead", "list", "--json"],
                 ["queues", "list"], *(["dead", "show", str(i)] for i in ids),
                 *(["dead", "show", str(i), "--json"] for i in ids),
                 *(["request", "show", str(i)] for i in ids), *(["request", "show", str(i), "--json"] for i in ids)):
        missing = argv[:2] == ["dead", "show"] and int(argv[2]) not in dead
        assert cli.main(argv) == (3 if missing else 0), argv
    out, err = capsys.readouterr()
    assert "qs-" in out or "***" in out  # the commands did print the requests
    produced = "\n".join(dumps) + caplog.text + out + err
    for secret in (SECRET, BEARER, "tok-DO-NOT-LEAK", token, "qs-DO-NOT-LEAK", "pw-DO-NOT-LEAK"):
        assert secret not in produced


def test_cli_request_send_and_show(db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pgdispatch.console import main as cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli.main(["request", "send", "--method", "PATCH", "--uri", "https://a.example/cdr",
                     "--body", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "--success-code", "202",
                     "--stop-code", "404", "--expire-in", "1d", "--interval", "30",
                     "--header", "X-Trace: 1", "--json"]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    assert scalar(db_url, "SELECT max_attempts FROM dispatch.jobs WHERE id = %s", (job_id,)) == 2880
    assert cli.main(["request", "show", str(job_id), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "available" and shown["args"]["stop_codes"] == [404, 418]
    assert shown["args"]["body"] == "***"  # a JWT is a credential: masked
    assert cli.main(["request", "show", "424242"]) == 3
    assert cli.main(["request", "send", "--method", "FETCH", "--uri", "https://a.example"]) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert cli.main(["request", "send", "--method", "GET", "--uri", "https://a.example", "--header", "nocolon"]) == 2


async def test_private_destinations_can_be_forbidden_after_dns_resolution(db_url: str, sink: Sink) -> None:
    port = sink.url.rsplit(":", 1)[1]
    literal = send(db_url, f"{sink.url}/200")
    named = send(db_url, f"http://localhost:{port}/200")
    mapped = send(db_url, f"http://[::ffff:127.0.0.1]:{port}/200")
    await drain(db_url, allow_private_networks=False)
    assert sink.received == []
    for job_id in (literal, named, mapped):
        reason, _, _, error = dead_row(db_url, job_id)  # type: ignore[misc]
        assert reason == "invalid" and "may not reach" in error
    # Allowed (tests, the embedded demo): the same request goes through.
    allowed = send(db_url, f"http://localhost:{port}/200")
    await drain(db_url)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs WHERE id = %s", (allowed,)) == 0
    assert len(sink.received) == 1
    # Forbidden, with an allow-list: by network (literal, mapped, and a name resolving into it),
    # and by host name; anything else private stays refused.
    by_network = [send(db_url, f"{sink.url}/200"), send(db_url, f"http://[::ffff:127.0.0.1]:{port}/200"),
                  send(db_url, f"http://localhost:{port}/200")]
    other = send(db_url, f"http://127.0.0.2:{port}/200")
    await drain(db_url, allow_private_networks=False, allowed=("127.0.0.1/32",))
    assert len(sink.received) == 4 and dead_row(db_url, by_network[0]) is None
    assert dead_row(db_url, other)[0] == "invalid"  # type: ignore[index]
    by_name = send(db_url, f"http://localhost:{port}/200")
    await drain(db_url, allow_private_networks=False, allowed=("LocalHost",))
    assert len(sink.received) == 5 and dead_row(db_url, by_name) is None
    with pytest.raises(ValueError, match="neither a network"):
        Destinations(allow_private=False, allowed=("http://x/",))


async def test_a_rotated_signing_key_is_used_at_once(db_url: str, sink: Sink) -> None:
    old, new = "old-secret-0123456789abcdef0123456789", "new-secret-0123456789abcdef0123456789"
    execute(db_url, "INSERT INTO dispatch.signing_keys (name, algorithm, secret) VALUES ('crm', 'HS256', %s)", (old,))
    keys = SigningKeys(db_url, ttl=3600)  # only the NOTIFY can refresh it within this test
    async with HttpTransport(max_connections=5) as http, Limits.open(db_url) as limits:
        runner = Runner(WorkerConfig(database_url=db_url, queues=("requests",), poll_interval=0.2),
                        builtin_executors(ExecutorContext(http=http, keys=keys, limits=limits)),
                        on_config_change=lambda _: keys.invalidate())
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.started.wait(), 30)
        send(db_url, f"{sink.url}/200", claims=json.dumps({"n": 1}), signing_key="crm")
        await wait_until(lambda: len(sink.received) == 1)
        execute(db_url, "UPDATE dispatch.signing_keys SET secret = %s WHERE name = 'crm'", (new,))
        await wait_until(lambda: keys.stats()["invalidations"] >= 1)  # the NOTIFY reached the worker
        send(db_url, f"{sink.url}/200", claims=json.dumps({"n": 2}), signing_key="crm")
        await wait_until(lambda: len(sink.received) == 2)
        runner.stop()
        await asyncio.wait_for(task, 30)
    await keys.close()
    first, second = (b["request"] for b in sink.bodies("/200"))
    assert jwt.decode(first, old, algorithms=["HS256"])["n"] == 1
    assert jwt.decode(second, new, algorithms=["HS256"])["n"] == 2


async def test_jobs_wait_for_a_fast_host_at_its_cap_instead_of_bouncing(
        db_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    # The acceptance: 20,000 requests to one host, a drain with the defaults (200 slots,
    # 64 per host). Only claims made before the host has answered once bounce what exceeds the
    # cap, and those come back within a fraction of a second (before: 1 s and more, and the drain
    # waited for them), so that the whole drain bounces nothing for more than 0.3 s.
    execute(db_url, f"SELECT dispatch.send_request('POST', '{sink.url}/brief', '{{}}') FROM generate_series(1, 20000)")
    delays: list[float] = []
    bounce = http_request._Host.bounce_delay

    def recorded(self: Any) -> float:
        delays.append(bounce(self))
        return delays[-1]

    monkeypatch.setattr(http_request._Host, "bounce_delay", recorded)
    runner = await drain(db_url)
    assert runner.counters.completed == 20000 and runner.counters.released <= 0.05 * 20000
    assert runner.counters.released == len(delays) and delays and max(delays) <= 0.3
    assert sink.most_in_flight == 64
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0


async def test_a_slow_host_bounces_jobs_and_the_drain_still_delivers_them(
        db_url: str, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_request._Host, "SLOW", 0.2)  # the sink's /lag answers in 0.4 s
    monkeypatch.setattr(http_request._Host, "MAX_WAIT", 0.5)
    execute(db_url, f"SELECT dispatch.send_request('POST', '{sink.url}/lag', '{{}}') FROM generate_series(1, 4)")
    runner = await drain(db_url, per_host_limit=1)
    # Slow answers: jobs gave their slots back instead of queueing for the host, and the drain
    # waited for the ones it had put back.
    assert runner.counters.completed == 4 and runner.counters.released >= 1
    assert sink.most_in_flight == 1
    errors = [r[0] for r in psycopg.connect(db_url).execute(
        "SELECT error FROM dispatch.job_history WHERE outcome = 'released'").fetchall()]
    # Said as it is: before its first answer the host has no latency to speak of (before: it
    # was "answering in 0.0s on average").
    assert errors and all(e.startswith("not sent: 1 requests to 127.0.0.1:") for e in errors)
    assert all(e.endswith(", which has not answered yet") or "answering in 0." in e for e in errors)
    assert scalar(db_url, "SELECT count(*) FROM dispatch.jobs") == 0
