"""One attempt of one job: run its executor, turn what came back into the row the engine writes.
Shared by the worker's runner and the inline drain, so both treat outcomes the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pgdispatch.db.errors import DatabaseUnavailable
from pgdispatch.notify.queue_policies import QueuePolicy
from pgdispatch.worker.backoff import backoff_delay
from pgdispatch.worker.deadlines import Deadlines
from pgdispatch.worker.engine import Finish
from pgdispatch.worker.job import Job, UnreadableArgs
from pgdispatch.worker.outcome import DONE, Discard, Done, InvalidJob, Outcome, Postpone, Retry

OWN_DATABASE_WAIT = 2.0  # seconds before a job that lost our database is tried again

# An executor returns an Outcome; None counts as Done (a function that returned normally).
Executor = Callable[[Job], Awaitable[Outcome | None]]


async def run_attempt(executor: Executor | None, job: Job, timeout: float | None,
                      deadlines: Deadlines | None = None) -> Outcome:
    """The outcome of one run of `executor`: a raised exception is a retry with the error
    recorded, InvalidJob a discard, a run past `timeout` (the queue's job_timeout) a retry.
    An expired job is dead without running; that is why any worker may claim one, whatever its
    kind (`executor` None). A worker running many jobs at once passes its `deadlines`: one
    ticker for all of them instead of a timer per job (asyncio.timeout was an eighth of a no-op
    job's CPU); a deadline then fires up to its resolution (a quarter second) late."""
    if job.expired:
        return Discard("expired", "expire_at passed before the job could run")
    if isinstance(job.args, UnreadableArgs):
        return Discard("invalid", f"its args cannot be decoded: {job.args.error}")
    if executor is None:
        return Postpone(60.0, f"this worker has no executor for kind {job.kind!r}")
    try:
        if timeout is None:  # asyncio.timeout(None) still costs ~4% of a delivery's CPU
            outcome = await executor(job)
        elif deadlines is not None:
            async with deadlines.after(timeout):
                outcome = await executor(job)
        else:
            async with asyncio.timeout(timeout):
                outcome = await executor(job)
    except InvalidJob as exc:
        return Discard("invalid", str(exc))
    except DatabaseUnavailable as exc:
        # Our own database (a restart, a pool timeout), not the job: no attempt is spent.
        return Postpone(OWN_DATABASE_WAIT, f"not run: {exc}; the attempt is not counted")
    except TimeoutError:
        return Retry(error=f"timed out after {timeout:g}s (queue job_timeout)")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a poisoned job never kills the worker
        return Retry(error=f"{type(exc).__name__}: {exc}")
    if outcome is None:
        return DONE
    if not isinstance(outcome, Done | Retry | Discard | Postpone):
        return Retry(error=f"executor for {job.kind!r} returned {outcome!r}, not an Outcome")
    return outcome


def finish_for(job: Job, outcome: Outcome, policy: QueuePolicy | None) -> Finish:
    """The finish_jobs row for `outcome`; a retry without its own delay takes the queue's backoff."""
    if isinstance(outcome, Done):
        return Finish(job.id, job.lease_token, "completed", status=outcome.status, detail=outcome.detail)
    if isinstance(outcome, Discard):
        return Finish(job.id, job.lease_token, "dead", reason=outcome.reason,
                      error=outcome.error, status=outcome.status, detail=outcome.detail)
    if isinstance(outcome, Postpone):
        return Finish(job.id, job.lease_token, "release", delay=outcome.after, error=outcome.reason)
    delay = outcome.after
    if delay is None:
        delay = (backoff_delay(job.attempt, base=policy.backoff_base, factor=policy.backoff_factor,
                               cap=policy.backoff_cap, jitter=policy.backoff_jitter)
                 if policy else 1.0)
    return Finish(job.id, job.lease_token, "retry", delay=delay, error=outcome.error,
                  status=outcome.status, detail=outcome.detail)


@dataclass(slots=True)
class Tally:
    """Attempts by how they settled: the worker's counters, and what an inline drain ran."""

    completed: int = 0
    retried: int = 0
    dead: int = 0
    released: int = 0

    def count(self, job: Job, finish: Finish) -> str:
        """Count `finish` as the database will settle it; returns that."""
        settled = settles_as(job, finish)
        if settled == "completed":
            self.completed += 1
        elif settled == "retry":
            self.retried += 1
        elif settled == "dead":
            self.dead += 1
        else:
            self.released += 1
        return settled


def settles_as(job: Job, finish: Finish) -> str:
    """What finish_jobs will make of `finish`: a retry with no attempt left, or one that would
    come due after the job's expiry, is dead (counters then agree with the database)."""
    if finish.outcome != "retry":
        return finish.outcome
    if job.attempt >= job.max_attempts:
        return "dead"
    if job.expire_at is not None and (
            datetime.now(UTC) + timedelta(seconds=finish.delay or 0)) > job.expire_at:
        return "dead"
    return "retry"
