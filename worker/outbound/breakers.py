"""Circuit breakers for outbound requests, one per (tenant, host), in each worker process.

Closed: requests go out; `failures` consecutive failures (timeouts, connection errors, 5xx,
429) open it. Open: nothing is sent for `cooldown` seconds; jobs are postponed without spending
an attempt. Then half-open: exactly one request goes out as a probe while the others keep
waiting; its success closes the breaker, its failure opens it for another cooldown.

State lives in the process, not the database: each worker process learns on its own, so with
N processes a dead endpoint gets at most N probes per cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Key = tuple[str | None, str]  # (tenant, host)


@dataclass
class _State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    def __init__(self, *, failures: int = 5, cooldown: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError("breaker failures must be >= 1 and cooldown > 0")
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._states: dict[Key, _State] = {}

    def wait_for(self, key: Key) -> float:
        """0 when a request to `key` may go out now (it may be the half-open probe), else the
        seconds until the breaker lets the next probe through."""
        state = self._states.get(key)
        if state is None or state.opened_at is None:
            return 0.0
        remaining = state.opened_at + self.cooldown - self._clock()
        if remaining > 0:
            return remaining
        if state.probing:
            return min(self.cooldown, 1.0)  # the probe is out; ask again shortly
        state.probing = True
        log.info("circuit for tenant %s at %s half-open: sending one probe", *key)
        return 0.0

    def record(self, key: Key, *, ok: bool) -> None:
        state = self._states.get(key)
        if ok:
            if state is not None:
                if state.opened_at is not None:
                    log.warning("circuit for tenant %s at %s closed: the probe succeeded", *key)
                del self._states[key]
            return
        if state is None:
            state = self._states[key] = _State()
        state.failures += 1
        if state.probing or (state.opened_at is None and state.failures >= self.failures):
            state.opened_at = self._clock()
            state.probing = False
            log.warning("circuit for tenant %s at %s open after %d consecutive failures: "
                        "nothing is sent for %gs", key[0], key[1], state.failures, self.cooldown)

    def abandon(self, key: Key) -> None:
        """The request was cancelled before it could tell anything: let another probe go."""
        state = self._states.get(key)
        if state is not None:
            state.probing = False

    def open_circuits(self) -> list[Key]:
        return [key for key, state in self._states.items() if state.opened_at is not None]
