"""What an executor gets from its worker process: the shared outbound machinery and settings.

One per process, built by worker/process.py; a kind takes what it needs from it instead of
being wired by hand, so a new kind (or channel adapter) needs no new plumbing."""

from __future__ import annotations

from dataclasses import dataclass, field

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
