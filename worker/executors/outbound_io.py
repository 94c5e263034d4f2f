"""Outbound for executors that speak a vendor's API through a channel adapter: the worker's
one HTTP pool, its destinations policy and the shared limits of one tenant key (rates,
concurrency caps, breakers, Retry-After pauses, across every worker and host)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

import httpx

from pgdispatch.worker.channels.delivery import Answer, NotSent
from pgdispatch.worker.executors.context import ExecutorContext
from pgdispatch.worker.outbound.destinations import forbidden_cause
from pgdispatch.worker.outbound.hosts import host_key
from pgdispatch.worker.outbound.limits import Wait
from pgdispatch.worker.outbound.transport import read_at_most, timed_out, transport_error
from pgdispatch.worker.outcome import Discard, Postpone, Retry

ANSWER_BYTES = 65_536  # of a vendor's answer read: its JSON verdict fits, a flood does not
VENDOR_PAUSE = 1.0  # a 429 that says not how long: every worker waits a second for the key


class LimitedIO:
    """Outbound (worker/channels/delivery.py) for one job, limited in its `scopes` (a feature's
    own: enterprise:N:crm; a credential's vendor scopes, telegram-bot:HASH and its chat, or
    credential:ID): each a shared limit, the first also the breaker's with the host. Each
    request waits at most `timeout` seconds for its answer.

    A 429 is the vendor's own word on its rate: a pause of the key for every worker (for its
    Retry-After, or the retry_after of a Telegram answer, else a second), never a breaker
    failure; timeouts, connection errors and 5xx are."""

    def __init__(self, context: ExecutorContext, scopes: str | Sequence[str], *, timeout: float) -> None:
        self._context = context
        self._scopes = [scopes] if isinstance(scopes, str) else list(scopes)
        self._timeout = timeout
        self.destinations = context.destinations

    async def request(self, method: str, url: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      slow_down: Callable[[Answer], float | None] | None = None) -> Answer:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        if parts.scheme not in ("http", "https") or not host:
            raise NotSent(Discard("invalid", error=f"not an http(s) URL: {parts.scheme}://{host}"))
        try:
            host = host_key(httpx.URL(url))
        except (httpx.InvalidURL, ValueError):
            raise NotSent(Discard("invalid", error=f"not a valid URL: {parts.scheme}://{host}")) from None
        # Scopes this feature owns: no producer's tenant can name them (limits.tenant_part).
        permit = await self._context.limits.admit_scopes(self._scopes, host)
        if isinstance(permit, Wait):
            raise NotSent(Postpone(permit.seconds, permit.reason))
        failed, retry_after, reason = True, None, "no answer"
        try:
            async with self._context.http.exchange(method, url, content=content, headers=headers,
                                                   timeout=self._timeout) as response:
                body = (await read_at_most(response, ANSWER_BYTES)).decode("utf-8", "replace")
            answer = Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, body)
            failed = answer.status >= 500
            if answer.status == 429:
                retry_after = answer.retry_after(VENDOR_PAUSE)
            elif slow_down is not None and (asked := slow_down(answer)) is not None:
                retry_after = asked
            elif answer.status == 503:
                retry_after = answer.retry_after()
            reason = f"answered {answer.status}"
            return answer
        except httpx.TransportError as exc:
            cause = forbidden_cause(exc)
            if cause is not None:
                failed = False
                raise NotSent(Discard("discarded", error=f"{host}: {cause}")) from None
            if timed_out(exc):
                raise NotSent(Retry(error=f"no answer from {host} within {self._timeout:g}s")) from None
            raise NotSent(Retry(error=f"{host}: {transport_error(exc)[1]}")) from None
        finally:
            await self._context.limits.settle(permit, failed=failed, retry_after=retry_after, reason=reason)
