"""The console's settings, given explicitly (the CLI reads the environment and flags)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from aiohttp import web

from pgdispatch.db.connections import DIRECT, ConnectionSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class DashboardConfig:
    database_url: str = field(repr=False)  # may hold a password
    connections: ConnectionSettings = DIRECT
    # A reverse proxy that authenticates users and names them in `user_header`: trusted only
    # for requests that come from these addresses (anyone else sending the header is ignored).
    trusted_proxies: tuple[Network, ...] = ()
    user_header: str | None = None
    # Cookies marked Secure: None = when the request came over HTTPS (directly, or as a trusted
    # proxy's X-Forwarded-Proto says).
    secure_cookies: bool | None = None
    session_hours: float = 12.0  # a session ends after this long without a request
    refresh_seconds: float = 5.0  # the overview refreshes itself this often (while visible)
    pool_size: int = 8
    page_size: int = 50
    # Rows a list reads at most per page beyond its cursor: a filter that matches little says
    # how far it looked and offers to look further, instead of walking a million rows.
    scan_limit: int = 10000
    # Seconds a bulk action over "everything the filter matches" works before it reports what
    # it did so far and how to go on.
    bulk_seconds: float = 20.0
    title: str = "pgdispatch"

    def trusts(self, address: str | None) -> bool:
        if not address or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)


def networks(text: str) -> tuple[Network, ...]:
    """'10.0.0.1,192.168.0.0/24' → networks (a ValueError names a bad one)."""
    found = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                found.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {part!r}") from None
    return tuple(found)


CONFIG = web.AppKey("config", DashboardConfig)
