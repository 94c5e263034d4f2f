"""A destination's host, said one way everywhere: in limit keys, breakers and the destination
policy. `API.Example.com.:443`, `api.example.com` and `https://x@api.example.com:443/` are one
host; without this, any host rule (rate, cap, breaker) would be a trailing dot or a default port
away from being bypassed. dispatch.request_host_v2 (sql/) says the same in SQL, so the jobs a
limit parks are the jobs it limits."""

from __future__ import annotations

import httpx

DEFAULT_PORTS = {"http": 80, "https": 443}


def hostname(url: httpx.URL) -> str:
    """The host name or IP literal, lower case, without the trailing dot(s) of a rooted name."""
    return url.host.lower().rstrip(".")


def host_key(url: httpx.URL) -> str:
    """host[:port] as limit keys name it: IPv6 in brackets, no port when it is the scheme's
    default (httpx already drops it: an explicit :443 on https is no other host)."""
    name = hostname(url)
    if ":" in name:
        name = f"[{name}]"
    port = url.port
    if port is None or port == DEFAULT_PORTS.get(url.scheme):
        return name
    return f"{name}:{port}"
