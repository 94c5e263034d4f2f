"""Which addresses outbound requests may reach.

With private networks forbidden, a request to a loopback, private, link-local, multicast or
reserved address is refused: IP literals before sending, host names after DNS resolution, inside
the connector's resolver, so the address checked is the address connected to (no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class ForbiddenDestination(OSError):
    """The destination resolves only to addresses outbound requests may not reach."""


def is_forbidden(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # not an IP literal: the resolver decides
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then drops every forbidden address."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if not is_forbidden(r["host"])]
        if not allowed:
            raise ForbiddenDestination(f"{host} resolves only to private, loopback or link-local "
                                       "addresses, which this worker may not reach")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def forbidden_cause(exc: BaseException) -> ForbiddenDestination | None:
    """The ForbiddenDestination behind a transport error, if that is what it was."""
    seen: Any = exc
    while seen is not None:
        if isinstance(seen, ForbiddenDestination):
            return seen
        os_error = getattr(seen, "os_error", None)
        if isinstance(os_error, ForbiddenDestination):
            return os_error
        seen = seen.__cause__
    return None
