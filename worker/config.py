"""Worker settings: keyword-only, literal defaults, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from pgdispatch.db.connections import ConnectionSettings
from pgdispatch.db.errors import ConfigurationError


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    database_url: str
    # Where the LISTEN connection goes when claims go through a pooler in transaction mode
    # (PgBouncer), which delivers no notifications: a direct URL to the same server. None: the
    # database_url. Maintenance's DDL (partitions detached CONCURRENTLY) goes there too.
    listen_url: str | None = None
    # database_url is a pooler in transaction mode: no connection prepares statements.
    transaction_pooler: bool = False
    # The user's App, as module:attribute; imported in every worker process.
    app: str | None = None
    # Queues to serve; empty: every queue in dispatch.queues, including ones created later.
    queues: tuple[str, ...] = ()
    # Concurrent job slots per worker process. Twice max_batch by default: the next claim is on
    # its way while the last batch runs (with slots == claim size, every claim waited for the whole
    # batch to finish and the worker idled through each claim's round trip: half the rate).
    concurrency: int = 200
    # Most jobs one claim takes; smaller claims spread work fairly across processes.
    max_batch: int = 100
    # Build number of this worker's code; jobs stamped newer are left for newer workers.
    version: int = 0
    # Seconds a claim is valid without a heartbeat; heartbeats run every lease/3.
    lease_seconds: float = 30.0
    # Polling: the safety net when a NOTIFY is lost; also how scheduled jobs are noticed.
    poll_interval: float = 1.0
    # Seconds between sweeps for expired leases of dead workers.
    rescue_interval: float = 5.0
    # Seconds a SIGTERM waits for running jobs before releasing them back to the queue.
    grace_seconds: float = 25.0
    # Process everything runnable now, then exit.
    drain: bool = False
    # Exit (code EXIT_NEWER_BUILD) when jobs stamped with a newer build are waiting.
    exit_on_newer: bool = False
    # Finish in-flight work and exit to be restarted when RSS exceeds this (MiB); 0: no limit.
    memory_limit_mb: int = 0
    # How long finished-attempt history and dead letters are kept (seconds).
    history_keep_seconds: float = 14 * 86400
    dead_keep_seconds: float = 30 * 86400
    # Debounce: a NOTIFY within this many seconds of the last claim waits until it has passed,
    # so a burst of single-row inserts is claimed in batches.
    fetch_cooldown: float = 0.002
    # Seconds to wait for the database at start before giving up.
    connect_timeout: float = 30.0
    pool_size: int = 4
    # VACUUM the jobs table when it holds this many dead row versions (checked every
    # vacuum_interval seconds); 0 leaves it all to autovacuum.
    vacuum_min_dead_tuples: int = 10_000
    vacuum_interval: float = 3.0
    # Requests in flight to one host per process, so one slow backend cannot take every slot.
    per_host_limit: int = 64
    # Circuit breakers per (tenant, host): this many consecutive failures open one for
    # breaker_cooldown seconds, then one probe decides.
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    # Whether outbound requests may reach loopback, private and link-local addresses, and the
    # networks and hosts they may reach even when not (the CLI forbids private networks unless
    # the worker runs on the embedded demo server).
    allow_private_networks: bool = True
    allowed_destinations: tuple[str, ...] = ()
    worker_name: str | None = None
    # Run the debug.* kinds (tests, benchmarks); production workers leave them waiting.
    debug_kinds: bool = False

    def __post_init__(self) -> None:
        _require(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}")
        _require(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}")
        _require(self.version >= 0, f"version must be >= 0, got {self.version}")
        _require(self.lease_seconds >= 1, f"lease_seconds must be >= 1, got {self.lease_seconds}")
        _require(self.poll_interval > 0, f"poll_interval must be > 0, got {self.poll_interval}")
        _require(self.rescue_interval > 0, f"rescue_interval must be > 0, got {self.rescue_interval}")
        _require(self.grace_seconds >= 0, f"grace_seconds must be >= 0, got {self.grace_seconds}")
        _require(self.memory_limit_mb >= 0, f"memory_limit_mb must be >= 0, got {self.memory_limit_mb}")
        _require(self.per_host_limit >= 1, f"per_host_limit must be >= 1, got {self.per_host_limit}")
        _require(self.breaker_failures >= 1, f"breaker_failures must be >= 1, got {self.breaker_failures}")
        _require(self.breaker_cooldown > 0, f"breaker_cooldown must be > 0, got {self.breaker_cooldown}")
        _require(self.pool_size >= 2, f"pool_size must be >= 2, got {self.pool_size}")
        _require(self.vacuum_min_dead_tuples >= 0,
                 f"vacuum_min_dead_tuples must be >= 0, got {self.vacuum_min_dead_tuples}")
        _require(self.vacuum_interval > 0, f"vacuum_interval must be > 0, got {self.vacuum_interval}")
        _require(self.fetch_cooldown >= 0, f"fetch_cooldown must be >= 0, got {self.fetch_cooldown}")
        _require(self.dead_keep_seconds > 0, f"dead_keep_seconds must be > 0, got {self.dead_keep_seconds}")
        _require(self.connect_timeout > 0, f"connect_timeout must be > 0, got {self.connect_timeout}")


    @property
    def connections(self) -> ConnectionSettings:
        return ConnectionSettings(transaction_pooler=self.transaction_pooler)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigurationError(message)
