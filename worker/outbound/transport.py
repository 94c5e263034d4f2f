"""The one HTTP connection pool of a worker process, and how a request goes through it.

httpx is the API (Request, Response, its exceptions); the aiohttp transport carries it, because
httpx's own pool collapses under concurrency (~370 vs ~3,900 req/s at 64 in flight on this
machine kind). Requests go to the transport directly, not through `httpx.AsyncClient.send`:
the client's per-request cookie jar, auth and redirect machinery cost as much CPU as the
transport itself (4,800 vs 8,600 req/s against a local sink), and a cookie jar shared by every
tenant of the process would carry one endpoint's cookies into another's requests.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
from collections.abc import AsyncIterator, Mapping
from email.utils import parsedate_to_datetime

import aiohttp
import httpx

from pgdispatch.worker.outbound.destinations import Destinations, ForbiddenDestination
from pgdispatch.worker.outbound.hosts import hostname

USER_AGENT = "pgdispatch"


class HttpTransport:
    """Owns the aiohttp session (built lazily inside the running loop) behind httpx's API.

    Every request goes through the destination policy here, whoever sends it (a request, a lead
    channel, a CRM, smart redirect, a CLI check): an IP literal (IPv4, IPv6, IPv4-mapped, 0.0.0.0,
    with userinfo or a stray `#`: as the URL parser reads it) is checked before sending, since
    aiohttp skips the resolver for those; a host name is checked after DNS, inside the
    connector's resolver, so the address checked is the address connected to (no DNS
    rebinding)."""

    def __init__(self, *, max_connections: int, destinations: Destinations | None = None) -> None:
        policy = destinations or Destinations(allow_private=True)
        self.destinations = policy
        from httpx_aiohttp import AiohttpTransport

        def session() -> aiohttp.ClientSession:
            resolver = policy.resolver()
            connector = aiohttp.TCPConnector(limit=max_connections, resolver=resolver,
                                             ssl=httpx.create_ssl_context())
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        self._transport = AiohttpTransport(client=session)

    async def __aenter__(self) -> HttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._transport.aclose()

    @contextlib.asynccontextmanager
    async def exchange(self, method: str, url: str | httpx.URL, *, content: bytes | None = None,
                       headers: Mapping[str, str] | None = None,
                       timeout: float = 30.0) -> AsyncIterator[httpx.Response]:
        """Send one request; the response's body is streamed and released on exit. A destination
        the policy forbids raises httpx.ConnectError caused by ForbiddenDestination (see
        destinations.forbidden_cause), like one refused after DNS."""
        request = httpx.Request(method, url, content=content,
                                headers={"User-Agent": USER_AGENT, **(headers or {})},
                                extensions={"timeout": httpx.Timeout(timeout).as_dict()})
        host = hostname(request.url)
        if self.destinations.forbids_address(host):
            raise httpx.ConnectError(f"{host}: forbidden destination") from ForbiddenDestination(
                f"{host} is a private, loopback or link-local address, which this worker may not reach")
        try:
            response = await self._transport.handle_async_request(request)
            try:
                yield response
            finally:
                await response.aclose()
        except aiohttp.ClientError as exc:
            # aiohttp's own errors escape the httpx transport when an answer is malformed (a bad
            # chunk size, say), and their text quotes the URL, query string and its keys included:
            # said in our own words, as an httpx error like every other failure to exchange.
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: the answer could not be read") from exc


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The first `limit` bytes of the body; the rest is never read into memory (an endpoint
    may answer with gigabytes)."""
    chunks = bytearray()
    async for chunk in response.aiter_raw():
        chunks += chunk
        if len(chunks) >= limit:
            break
    return bytes(chunks[:limit])


MAX_RETRY_AFTER = 86_400.0  # a Retry-After is honoured up to a day
_SECONDS = re.compile(r"[0-9]+")


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header in seconds (given as seconds or an HTTP date), at most a day; None
    when there is none or it cannot be read (`²`, `1e3`, a date from nowhere): a remote's header
    is anyone's text."""
    value = (value or "").strip()
    if not value:
        return None
    if _SECONDS.fullmatch(value):  # ASCII digits only (str.isdigit takes `²`); any length
        return MAX_RETRY_AFTER if len(value) > 6 else min(float(value), MAX_RETRY_AFTER)
    if len(value) > 64:
        return None
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, min(when - now, MAX_RETRY_AFTER))


def timed_out(exc: httpx.HTTPError) -> bool:
    # Transports differ in how they map errors (httpx-aiohttp reports a refused connection as
    # ConnectTimeout): trust the underlying cause when there is one.
    cause = exc.__cause__
    if cause is not None:
        return isinstance(cause, TimeoutError)
    return isinstance(exc, httpx.TimeoutException)


def transport_error(exc: httpx.HTTPError) -> tuple[str, str]:
    """(error class, message) named after what really failed: transports mislabel causes
    (httpx-aiohttp reports a refused connection and a failed DNS lookup as ConnectTimeout).
    httpx messages can quote the URL and its credentials: the message is in our own words."""
    cause = exc.__cause__
    os_error = getattr(cause, "os_error", cause)
    if isinstance(os_error, socket.gaierror):
        return "DNSError", "DNSError: could not resolve the host name"
    if isinstance(os_error, OSError) and os_error.errno == errno.ECONNREFUSED:
        return "ConnectError", "ConnectError: connection refused"
    error_class = "ConnectError" if isinstance(exc, httpx.ConnectTimeout) else type(exc).__name__
    if isinstance(os_error, OSError) and os_error.strerror:
        reason = os_error.strerror.lower()
    else:
        reason = type(cause or exc).__name__
    return error_class, f"{error_class}: could not complete the request ({reason})"
