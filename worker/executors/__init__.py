"""Executors: one async callable per job kind, returning an Outcome."""

from __future__ import annotations

from worker.executors import debug
from worker.executors.breakers import Breakers
from worker.executors.http_request import HttpRequestExecutor
from worker.executors.http_transport import HttpTransport
from worker.executors.signing import SigningKeys
from worker.runner import Executor


def builtin_executors(*, http: HttpTransport, keys: SigningKeys, per_host_limit: int = 64,
                      allow_private_networks: bool = True,
                      breakers: Breakers | None = None,
                      debug_kinds: bool = False) -> dict[str, Executor]:
    """Every executor this build knows, by kind, sharing the process's HTTP transport. The
    debug.* kinds (tests, benchmarks) only when asked for: a production worker never runs them."""
    executors: dict[str, Executor] = {
        "http.request": HttpRequestExecutor(http, keys, per_host_limit=per_host_limit,
                                            allow_private_networks=allow_private_networks,
                                            breakers=breakers)}
    if debug_kinds:
        executors.update(debug.EXECUTORS)
    return executors
