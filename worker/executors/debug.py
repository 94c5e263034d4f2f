"""Built-in kinds for tests, demos and benchmarks."""

from __future__ import annotations

import asyncio

from pgdispatch.worker.attempt import Executor
from pgdispatch.worker.job import Job
from pgdispatch.worker.outcome import DONE, InvalidJob, Outcome, Retry


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


async def flaky(job: Job) -> Outcome:
    """Fails until attempt `succeed_on` (default 2), then succeeds: a transient fault."""
    succeed_on = job.args.get("succeed_on", 2)
    if isinstance(succeed_on, bool) or not isinstance(succeed_on, int):
        raise InvalidJob(f"debug.flaky: args.succeed_on must be an integer, got {succeed_on!r}")
    if job.attempt < succeed_on:
        return Retry(error=f"debug.flaky: attempt {job.attempt} of {succeed_on} fails")
    return DONE


EXECUTORS: dict[str, Executor] = {"debug.noop": noop, "debug.sleep": sleep, "debug.fail": fail,
                                  "debug.flaky": flaky}
