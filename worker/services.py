"""Background duties of a worker process, under one lifecycle.

Long-running services (the outcome writer, the listener) are supervised: one that dies is
logged and started again, so a bug in one can never hang the process or its shutdown. Periodic
duties (rescue, history maintenance, vacuum, heartbeats) run on their own timer; a singleton duty
runs in one worker of all at a time, elected through a lease row (dispatch.duties), and passes
to another worker when its holder stops renewing it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[float | None]]


async def supervised(name: str, run: Callable[[], Awaitable[None]], *,
                     max_backoff: float = 5.0) -> None:
    """Run `run` until it returns; when it raises, log it and start it again after a backoff."""
    failures = 0
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            failures += 1
            delay = min(max_backoff, 0.05 * 2**failures)
            log.exception("%s died; restarting it in %.2fs", name, delay)
            await asyncio.sleep(delay)


async def periodic(name: str, every: float, step: Step, *,
                   elect: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Run `step` every `every` seconds, forever. A step may return the delay before its next
    run (backing off); a failed step is logged and tried again at the next tick. With `elect`,
    the step runs only while `elect()` says this worker holds the duty."""
    delay = every
    while True:
        await asyncio.sleep(delay)
        delay = every
        try:
            if elect is not None and not await elect():
                continue
            chosen = await step()
            if chosen is not None:
                delay = chosen
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", name, exc)
