"""Built-in kinds for tests, demos and benchmarks."""

from __future__ import annotations

import asyncio

from worker.job import Job
from worker.outcome import DONE, InvalidJob, Outcome, Retry
from worker.runner import Executor


async def noop(job: Job) -> Outcome:
    return DONE


async def sleep(job: Job) -> Outcome:
    seconds = job.args.get("seconds", 1)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 86400:
        raise InvalidJob(f"debug.sleep: args.seconds must be a number of seconds in [0, 86400], "
                         f"got {seconds!r}")
    await asyncio.sleep(seconds)
    return DONE


async def fail(job: Job) -> Outcome:
    return Retry(error=str(job.args.get("error", "debug.fail always fails")))


EXECUTORS: dict[str, Executor] = {"debug.noop": noop, "debug.sleep": sleep, "debug.fail": fail}
