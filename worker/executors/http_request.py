"""Kind `http.request`: the seed-000 dispatcher, on the engine.

The request comes from dispatch.send_request (args: method, uri, body | claims + signing_key,
success_code, stop_codes, attempt_interval, http_timeout, headers, webhook_key). The outcome:
status == success_code → Done; status in stop_codes (418 always) → Discard('stop_code');
anything else, timeouts and network errors → Retry after attempt_interval (or Retry-After on
429/503). The engine turns an exhausted budget or a retry past expire_at into a dead job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from pgdispatch.db import masking
from pgdispatch.worker.deadlines import Deadlines
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.job import Job
from pgdispatch.worker.outbound.destinations import forbidden_cause
from pgdispatch.worker.outbound.hosts import host_key, hostname
from pgdispatch.worker.outbound.limits import Wait
from pgdispatch.worker.outbound.signing import sign_jwt, webhook_headers
from pgdispatch.worker.outbound.transport import read_at_most, retry_after_seconds, timed_out, transport_error
from pgdispatch.worker.outcome import Discard, Done, InvalidJob, Outcome, Postpone, Retry

log = logging.getLogger(__name__)
# httpx logs every request line with its full URL at INFO, credentials in the query string
# included: in a worker process those lines must never be written.
logging.getLogger("httpx").setLevel(logging.WARNING)

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
RESPONSE_EXCERPT_BYTES = 2048
NEW_HOST_BOUNCE = 0.2  # seconds, about, before a job bounced off a host not heard from yet is back
HEADERS_OF_INTEREST = ("content-type", "retry-after", "location", "x-request-id", "request-id",
                       "ratelimit-remaining", "ratelimit-reset", "x-ratelimit-remaining")
_HEADERS_OF_INTEREST_RAW = frozenset(h.encode() for h in HEADERS_OF_INTEREST)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\r\n\x00]")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    uri: str
    url: httpx.URL  # parsed once: the transport takes it as it is
    host: str
    hostname: str
    body: str | None
    claims: dict[str, Any] | None
    signing_key: str | None
    success_code: int
    stop_codes: frozenset[int]
    interval: int
    timeout: float
    headers: dict[str, str]
    webhook_key: str | None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> HttpRequest:
        """Validate a stored request; a row inserted by hand may hold anything."""
        method = args.get("method")
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise InvalidJob(f"method must be one of {', '.join(sorted(METHODS))}, got {method!r}")
        uri = args.get("uri")
        try:
            url = httpx.URL(uri) if isinstance(uri, str) else None
        except (httpx.InvalidURL, ValueError, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise InvalidJob(f"uri must be an absolute http(s) URL, got {mask_url(str(uri))[:200]!r}")
        body = args.get("body")
        claims = args.get("claims")
        if body is not None and not isinstance(body, str):
            raise InvalidJob("body must be a string")
        if claims is not None and (not isinstance(claims, dict) or not args.get("signing_key")):
            raise InvalidJob("claims must be a JSON object and need a signing_key")
        headers = args.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise InvalidJob("headers must be an object of strings")
        for name, value in headers.items():
            if not _HEADER_NAME.match(name) or _HEADER_VALUE_FORBIDDEN.search(value):
                # A row inserted by hand (send_request refuses these): the HTTP client would fail
                # every attempt, each retried as if the remote were at fault.
                raise InvalidJob(f"header {name[:64]!r}: a header name is a token, and a value "
                                 "holds no CR, LF or NUL")
        return cls(
            # host: host[:port] as limit keys name it (hosts.host_key), the key of per-host caps
            # and circuits.
            method=method.upper(), uri=uri, url=url, host=host_key(url), hostname=hostname(url),  # type: ignore[arg-type]
            body=body,
            claims=claims, signing_key=args.get("signing_key"),
            success_code=_int(args, "success_code", 200, 100, 599),
            stop_codes=frozenset(_codes(args.get("stop_codes", [])) | {418}),
            interval=_int(args, "attempt_interval", 60, 1, 10**7),
            timeout=_int(args, "http_timeout", 30, 1, 3600),
            headers=headers, webhook_key=args.get("webhook_key"))


class _Host:
    """Requests in flight to one host in this process, and how fast it answers lately.

    At the cap, a job waits for a slot while the host is answering fast: it has answered
    before, in under SLOW seconds on average, and nothing in flight is older than that. Then
    the wait is a fraction of a second, and one host is the common case: bouncing such jobs
    back to the queue costs a claim, a release and a history row each. A host that is slow,
    hung or not yet heard from gets no waiters: the job gives its worker slot back at once,
    so one host cannot fill the process with jobs queueing for it (fairness; waiting for a
    host not heard from let a hung one hold every slot for its first second). A job bounced
    while the host is new (not heard from, its first request under SLOW old) comes back in a
    fraction of a second: a drain's first claims fill more slots than the cap before the host
    has answered once, and such a host is most often about to answer fast."""

    SLOW = 1.0  # seconds: an answer slower than this, on average or in flight, stops the waiting
    MAX_WAIT = 5.0  # the longest a job waits in its worker slot for a host slot

    def __init__(self, limit: int) -> None:
        self._semaphore = asyncio.Semaphore(limit)
        self._semaphore_limit = limit
        self._in_flight: dict[int, float] = {}  # request number -> when it started
        self._sent = 0
        self._answers = 0
        self._bounced = (0.0, 0)  # (window start, jobs bounced in it), monotonic seconds
        self.latency = 0.0  # moving average of answer times, in seconds

    async def acquire(self) -> int | None:
        """A slot (a number for release), or None when the job should not wait for one."""
        deadline = time.monotonic() + self.MAX_WAIT
        while self._semaphore.locked():
            now = time.monotonic()
            allowed = min(self._fast_for(now), deadline - now)
            if allowed <= 0:
                return None
            try:
                async with asyncio.timeout(allowed):
                    await self._semaphore.acquire()
                break
            except TimeoutError:
                continue  # look again: the oldest request may have finished meanwhile
        else:
            await self._semaphore.acquire()  # free: returns at once
        self._sent += 1
        self._in_flight[self._sent] = time.monotonic()
        return self._sent

    def release(self, number: int) -> None:
        seconds = time.monotonic() - self._in_flight.pop(number)
        self._semaphore.release()
        self._answers += 1
        self.latency += (seconds - self.latency) * max(0.2, 1 / self._answers)

    def bounce_delay(self) -> float:
        """How long a job bounced off this host (at its cap) waits: 0.1-0.3 s while the host is
        new (not heard from, its first request under SLOW old); else 1 s plus up to 30 s, longer
        the more jobs bounced in the last 10 s, so a big backlog for a hung host spreads out
        instead of cycling through the queue every second. With jitter."""
        now = time.monotonic()
        start, count = self._bounced
        if now - start > 10:
            start, count = now, 0
        self._bounced = (start, count + 1)
        if not self._answers and min(self._in_flight.values(), default=now) + self.SLOW > now:
            return NEW_HOST_BOUNCE * (0.5 + random.random())
        return 1 + random.random() * min(30.0, count / self._semaphore_limit)

    def describe(self) -> str:
        """How it answers, for the reason of a bounced job."""
        if not self._answers:
            return "which has not answered yet"
        return f"answering in {self.latency:.1f}s on average"

    def _fast_for(self, now: float) -> float:
        """How much longer the host counts as answering fast (0: it does not)."""
        if not self._answers or self.latency > self.SLOW:
            return 0.0
        oldest = min(self._in_flight.values(), default=now)
        return oldest + self.SLOW - now


class HttpRequestExecutor:
    """Sends requests through the process's one HTTP transport; a per-host cap keeps one slow
    backend from taking every slot of the process."""

    def __init__(self, context: ExecutorContext, *, clock: Any = time.time) -> None:
        self._http = context.http
        self._destinations = context.destinations
        self._keys = context.keys
        self._per_host_limit = context.per_host_limit
        self._hosts: dict[str, _Host] = {}
        self._limits = context.limits
        self._deadlines = Deadlines()
        self._clock = clock

    async def __call__(self, job: Job) -> Outcome:
        request = HttpRequest.from_args(job.args)
        now = self._clock()
        if job.expire_at is not None and now >= job.expire_at.timestamp():
            return Discard("expired", "expire_at passed before sending")
        if self._destinations.forbids(request.hostname):
            return Discard("invalid", f"destination {request.hostname} is a private, loopback or "
                                      "link-local address, which this worker may not reach")
        # Limits shared with every worker first: a job waiting for a token or a slot must not
        # hold one of this process's slots for the host meanwhile.
        permit = await self._limits.admit(job.tenant, request.host)
        if isinstance(permit, Wait):
            return Postpone(permit.seconds, permit.reason)
        host = self._hosts.get(request.host)
        if host is None:
            host = self._hosts[request.host] = _Host(self._per_host_limit)
        slot: int | None = None
        try:  # every await from here on may be cancelled (the job's timeout, a shutdown)
            slot = await host.acquire()
            if slot is None:
                # A slow or hung host: the job gives its worker slot back rather than waiting in
                # it, so one host cannot fill the process with jobs queueing for it (fairness).
                self._limits.cancel(permit)
                return Postpone(host.bounce_delay(),
                                f"not sent: {self._per_host_limit} requests to {request.host} "
                                f"already in flight in this worker, {host.describe()}")
            outcome = await self._send(job, request, now)
        except BaseException:
            self._limits.cancel(permit)
            raise
        finally:
            if slot is not None:
                host.release(slot)
        await self._limits.settle(permit, failed=_endpoint_failed(outcome),
                                  retry_after=_paused_for(outcome), reason=_why(outcome))
        return outcome

    async def _send(self, job: Job, request: HttpRequest, now: float) -> Outcome:
        body = await self._body(job, request, now)
        headers = {"Content-Type": "application/json", **request.headers}
        if request.webhook_key:
            key = await self._keys.get(request.webhook_key)
            headers.update(webhook_headers(key, message_id=f"msg_{job.id}", body=body, now=now))
        started = datetime.now(UTC)
        t0 = time.perf_counter()
        try:
            async with self._deadlines.after(request.timeout), self._http.exchange(
                    request.method, request.url, content=body, headers=headers,
                    timeout=request.timeout) as response:
                excerpt = await _read_excerpt(response)
        except TimeoutError:
            return self._retry(request, job, started, t0, f"timed out after {request.timeout}s",
                               "TimeoutError")
        except httpx.HTTPError as exc:
            forbidden = forbidden_cause(exc)
            if forbidden is not None:
                return Discard("invalid", str(forbidden))
            if timed_out(exc):
                return self._retry(request, job, started, t0, f"timed out after {request.timeout}s",
                                   type(exc).__name__)
            error_class, error = transport_error(exc)
            return self._retry(request, job, started, t0, error, error_class)
        detail = _detail(started, t0, response, excerpt)
        status = response.status_code
        if status == request.success_code:
            # The job row leaves on success: keep what was sent (credentials masked), so
            # `request show` of a delivered request still says what it was.
            detail["request"] = {"method": request.method, "uri": mask_url(request.uri)}
            return Done(status=status, detail=detail)
        error = f"HTTP {status} (expected {request.success_code})"
        if status in request.stop_codes:
            return Discard("stop_code", error, status=status, detail=detail)
        # Retry-After wins over the interval; it also pauses the key for every worker. One that
        # cannot be read (`²`, 5,000 digits) counts as the interval, for both.
        pause = _retry_after(response, now)
        if pause is None and status in (429, 503) and "retry-after" in response.headers:
            pause = float(request.interval)
        if pause is not None:
            detail["retry_after"] = pause
        return Retry(after=pause if pause is not None else float(request.interval), error=error,
                     status=status, detail=detail)

    async def _body(self, job: Job, request: HttpRequest, now: float) -> bytes:
        payload = request.body
        if request.claims is not None and request.signing_key:
            key = await self._keys.get(request.signing_key)
            payload = sign_jwt(key, request.claims, job_id=job.id, expire_at=job.expire_at, now=now)
        # {"request": ..., "__task": {"createdAt", "attempt": {"number", "limit", "interval"}}},
        # formatted by hand: a general JSON encoder per request cost 4% of a delivery's CPU.
        limit = "null" if job.max_attempts is None else int(job.max_attempts)
        return (f'{{"request":{json.dumps(payload)},"__task":{{"createdAt":{int(job.created_at.timestamp())},'
                f'"attempt":{{"number":{int(job.attempt)},"limit":{limit},'
                f'"interval":{int(request.interval)}}}}}}}').encode()

    def _retry(self, request: HttpRequest, job: Job, started: datetime, t0: float, error: str,
               error_class: str) -> Retry:
        detail = {"started_at": started.isoformat(), "duration_ms": _ms(t0),
                  "error_class": error_class}
        log.info("request job %s attempt %d to %s failed: %s", job.id, job.attempt,
                 mask_url(request.uri), error)
        return Retry(after=request.interval, error=error, detail=detail)


def _paused_for(outcome: Outcome) -> float | None:
    """A 429 or 503 that said when to come back: every worker waits that long for the key."""
    if isinstance(outcome, Retry) and outcome.status in (429, 503) and outcome.detail is not None:
        return outcome.detail.get("retry_after")
    return None


def _why(outcome: Outcome) -> str:
    return getattr(outcome, "error", None) or type(outcome).__name__


def _endpoint_failed(outcome: Outcome) -> bool:
    """What counts against a circuit: no answer, or an answer that says the endpoint is unwell."""
    return isinstance(outcome, Retry) and (outcome.status is None or outcome.status >= 500
                                           or outcome.status == 429)


def mask_url(uri: str) -> str:
    """The URL without credentials: userinfo and secret-looking query values are masked."""
    if "@" not in uri and "?" not in uri and "&" not in uri:
        return uri  # nothing to mask (the common case; this runs once per delivery)
    return masking.mask_url(uri)


def _retry_after(response: httpx.Response, now: float) -> float | None:
    """The Retry-After of a 429/503 in seconds, if any."""
    if response.status_code not in (429, 503):
        return None
    return retry_after_seconds(response.headers.get("retry-after"), now)


async def _read_excerpt(response: httpx.Response) -> str:
    """The first 2 KB of the body."""
    return (await read_at_most(response, RESPONSE_EXCERPT_BYTES)).decode("utf-8", "replace")


def _detail(started: datetime, t0: float, response: httpx.Response, excerpt: str) -> dict[str, Any]:
    return {
        "started_at": started.isoformat(),
        "duration_ms": _ms(t0),
        "response_body": excerpt.replace("\x00", ""),
        # One pass over the raw headers: httpx's Headers lookups scan the list each time.
        "response_headers": {name.lower().decode("latin-1"): value.decode("latin-1")
                             for name, value in response.headers.raw
                             if name.lower() in _HEADERS_OF_INTEREST_RAW},
    }


def _ms(t0: float) -> int:
    return round((time.perf_counter() - t0) * 1000)


def _int(args: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidJob(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _codes(value: Any) -> set[int]:
    if not isinstance(value, list) or not all(isinstance(c, int) and 100 <= c <= 599 for c in value):
        raise InvalidJob(f"stop_codes must be a list of HTTP statuses, got {value!r}")
    return set(value)
