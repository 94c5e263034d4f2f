"""What an executor gets from its worker process: the shared outbound machinery and settings.

One per process, opened by executor_context(); a kind takes what it needs from it instead of
being wired by hand, so a new kind (or channel adapter) needs no new plumbing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pgdispatch.db.connections import DIRECT, ConnectionSettings, guarded, open_pool
from pgdispatch.notify import config_message
from pgdispatch.notify.integrations import IntegrationConfigs
from pgdispatch.worker.job import ConnectionSource
from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outbound.limits import Limits
from pgdispatch.worker.outbound.signing import SigningKeys
from pgdispatch.worker.outbound.transport import HttpTransport


@dataclass(frozen=True, kw_only=True)
class ExecutorContext:
    http: HttpTransport
    keys: SigningKeys
    # Rate limits, caps, breakers and pauses shared with every other worker (dispatch.limits).
    limits: Limits
    # Requests in flight to one host per process, so one slow backend cannot take every slot.
    per_host_limit: int = 64
    # Which destinations requests may reach (private networks, and the allow-list).
    destinations: Destinations = field(default_factory=lambda: Destinations(allow_private=True))
    # Connections for executors that read their own records (lead deliveries: the lead and the
    # credential), apart from the engine's, so claims and outcomes never wait behind them.
    database: ConnectionSource | None = None
    # Enterprises' integration configs (call events), kept fresh by NOTIFY.
    integrations: IntegrationConfigs | None = None


@contextlib.asynccontextmanager
async def executor_context(database_url: str, *, destinations: Destinations, max_connections: int,
                           per_host_limit: int = 64, breaker_failures: int = 5,
                           breaker_cooldown: float = 30.0, slot_lease: float = 30.0,
                           holder: str | None = None, settings: ConnectionSettings = DIRECT
                           ) -> AsyncIterator[ExecutorContext]:
    """The shared outbound machinery of one process (a worker, the pool's smart redirect, a
    CLI check), opened and closed together: the HTTP pool, the shared limits, the signing
    keys, a small pool for the executors' own reads and the integration config cache on it.
    Feeding them NOTIFY (`on_config_change`) is the owner's part: it owns the listener."""
    async with contextlib.AsyncExitStack() as stack:
        limits = await stack.enter_async_context(Limits.open(
            database_url, breaker_failures=breaker_failures, breaker_cooldown=breaker_cooldown,
            slot_lease=slot_lease, holder=holder, settings=settings))
        http = await stack.enter_async_context(HttpTransport(max_connections=max_connections,
                                                             destinations=destinations))
        keys = SigningKeys(database_url, settings=settings)
        stack.push_async_callback(keys.close)
        pool = open_pool(database_url, settings=settings, name="executors", min_size=1, max_size=4)
        await pool.open(wait=False)
        stack.push_async_callback(pool.close)
        # guarded: an executor's read that loses our database postpones its job, never fails it.
        yield ExecutorContext(http=http, keys=keys, limits=limits, per_host_limit=per_host_limit,
                              destinations=destinations, database=guarded(pool),
                              integrations=IntegrationConfigs(pool))


def on_config_change(context: ExecutorContext, payload: str | None) -> None:
    """A config-channel notification (None: the listener reconnected) for every cache in it."""
    if config_message(payload).get("table") in ("signing_keys", None):
        context.keys.invalidate()
    context.limits.on_notify(payload)
    if context.integrations is not None:
        context.integrations.on_notify(payload)
