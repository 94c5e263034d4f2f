"""What an executor returns. Executors steer the engine with these values; only the engine
writes job state. `detail` is what the attempt log keeps of this attempt (job_history.detail)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgdispatch.db.errors import PgDispatchError

DISCARD_REASONS = frozenset({"discarded", "invalid", "expired", "stop_code", "exhausted"})


@dataclass(frozen=True, slots=True)
class Done:
    """The work is delivered; the job leaves the queue."""

    status: int | None = None
    detail: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again later: after `after` seconds, or the queue's backoff when None."""

    after: float | None = None
    error: str | None = None
    status: int | None = None
    detail: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.after is not None and self.after < 0:
            raise ValueError(f"Retry.after must be >= 0 seconds, got {self.after}")


@dataclass(frozen=True, slots=True)
class Discard:
    """Never try again: the job goes to dispatch.dead_jobs with `reason`."""

    reason: str = "discarded"
    error: str | None = None
    status: int | None = None
    detail: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.reason not in DISCARD_REASONS:
            raise ValueError(f"Discard.reason must be one of {sorted(DISCARD_REASONS)}, got {self.reason!r}")


@dataclass(frozen=True, slots=True)
class Postpone:
    """Nothing was attempted (an open circuit breaker, a host already at its cap): back to the
    queue after `after` seconds without spending an attempt. `reason` is kept as last_error."""

    after: float
    reason: str

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError(f"Postpone.after must be >= 0 seconds, got {self.after}")


Outcome = Done | Retry | Discard | Postpone
DONE = Done()


class InvalidJob(PgDispatchError):
    """Raised by an executor when the job's args cannot be run: dead-lettered as 'invalid'."""
