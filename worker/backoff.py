"""Retry spacing: exponential with jitter, capped. A pure function; randomness is injected."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(attempt: int, *, base: float, factor: float, cap: float, jitter: float,
                  uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first).

    base * factor^(attempt-1), capped at `cap`, then spread by ±jitter (a fraction) so that
    jobs failing together do not come back together.
    """
    if attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    exponent = min(attempt - 1, 64)  # beyond this every realistic cap is reached anyway
    delay = min(cap, base * factor**exponent)
    if jitter:
        delay *= 1 + uniform(-jitter, jitter)
    return max(0.0, delay)
