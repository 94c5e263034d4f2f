"""Which addresses outbound requests may reach.

With private networks forbidden, a request to a loopback, private, link-local, multicast or
reserved address is refused: IP literals before sending, host names after DNS resolution, inside
the connector's resolver, so the address checked is the address connected to (no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class ForbiddenDestination(OSError):
    """The destination resolves only to addresses outbound requests may not reach."""


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class Destinations:
    """The destination policy of a worker: private networks forbidden or allowed, and the
    networks and host names allowed even when they are forbidden (an internal service behind
    nginx on 127.0.0.1, a partner API on a private link)."""

    def __init__(self, *, allow_private: bool, allowed: Sequence[str] = ()) -> None:
        self.allow_private = allow_private
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in allowed:
            text = entry.strip().lower()
            network = _network(text)
            if network is not None:
                networks.append(network)
            elif _HOSTNAME.match(text):
                hosts.add(text)
            else:
                raise ValueError(f"allowed destination {entry!r} is neither a network "
                                 "(10.0.0.0/8, 127.0.0.1) nor a host name (nginx.internal)")
        self.networks = tuple(networks)
        self.hosts = frozenset(hosts)

    def describe(self) -> str:
        if self.allow_private:
            return "every destination allowed (private networks included)"
        allowed = [str(n) for n in self.networks] + sorted(self.hosts)
        return ("private, loopback and link-local addresses forbidden"
                + (f" except {', '.join(allowed)}" if allowed else ""))

    def forbids(self, host: str) -> bool:
        """Before sending: whether `host` (a name or an IP literal) is refused outright. A name
        not allowed by name is checked again after DNS, by the resolver."""
        if self.allow_private or host.lower() in self.hosts:
            return False
        return self.forbids_address(host)

    def forbids_address(self, address: str) -> bool:
        """Whether `address`, an IP literal, is refused (False for a name: the resolver
        decides). IPv4-mapped IPv6 is checked as the IPv4 address it maps."""
        if self.allow_private:
            return False
        ip = ip_literal(address)
        if ip is None:
            return False  # not an IP literal: the resolver decides
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.networks):
            return False
        return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                    or ip.is_reserved or ip.is_unspecified)

    def resolver(self) -> AbstractResolver | None:
        return None if self.allow_private else CheckedResolver(self)

    async def addresses(self, host: str, port: int) -> list[ResolveResult]:
        """The addresses of `host` (a name or an IP literal, IPv4 and IPv6) this policy lets a
        connection reach; ForbiddenDestination when there is none. A channel that opens its own
        connection (SMTP) connects to one of these, never to a name resolved again."""
        resolver: AbstractResolver = ThreadedResolver() if self.allow_private else CheckedResolver(self)
        try:
            return await resolver.resolve(host.rstrip(".") or host, port, socket.AF_UNSPEC)
        finally:
            await resolver.close()


_NUMERIC_IPV4 = re.compile(r"(?i)^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def ip_literal(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`address` as an IP address when it is one however it is written: IPv6 with or without
    brackets and zone, and the shorthand IPv4 forms the C library takes (2130706433, 0x7f.1,
    127.1), which some clients connect to as they are."""
    text = address.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if _NUMERIC_IPV4.match(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


class CheckedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then drops every forbidden address."""

    def __init__(self, destinations: Destinations) -> None:
        self._inner = ThreadedResolver()
        self._destinations = destinations

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._destinations.hosts:
            return results
        allowed = [r for r in results if not self._destinations.forbids_address(r["host"])]
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
