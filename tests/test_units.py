"""Pure functions: backoff, outcomes, durations, error translation."""

from __future__ import annotations

import argparse

import psycopg
import pytest

from pgdispatch import sql
from pgdispatch.console import common
from pgdispatch.db.errors import DatabaseUnavailable, InvalidInput, translate
from pgdispatch.worker.backoff import backoff_delay
from pgdispatch.worker.outcome import Discard, Retry


def test_backoff_grows_exponentially_and_caps() -> None:
    no_jitter = {"base": 1.0, "factor": 2.0, "cap": 60.0, "jitter": 0.0}
    assert [backoff_delay(n, **no_jitter) for n in (1, 2, 3, 4, 7, 8, 500)] == [1, 2, 4, 8, 60, 60, 60]


def test_backoff_jitter_stays_within_the_fraction() -> None:
    low = backoff_delay(3, base=1, factor=2, cap=60, jitter=0.25, uniform=lambda a, b: a)
    high = backoff_delay(3, base=1, factor=2, cap=60, jitter=0.25, uniform=lambda a, b: b)
    assert (low, high) == (3.0, 5.0)
    with pytest.raises(ValueError):
        backoff_delay(0, base=1, factor=2, cap=60, jitter=0)


def test_outcomes_validate_their_fields() -> None:
    with pytest.raises(ValueError):
        Retry(after=-1)
    with pytest.raises(ValueError):
        Discard("whatever")


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("5m", 300), ("2h", 7200),
                                                ("7d", 604800), ("250ms", 0.25), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert common.duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        common.duration("tomorrow")


def test_translate_maps_driver_errors() -> None:
    assert isinstance(translate(psycopg.OperationalError("connection refused")), DatabaseUnavailable)
    assert isinstance(translate(psycopg.errors.CheckViolation("x")), InvalidInput)


def test_named_queries_load() -> None:
    assert "claim_jobs_v2" in sql.query("claim_jobs")
    with pytest.raises(KeyError, match="no query named"):
        sql.query("nope")


def test_breaker_and_postpone_refuse_nonsense() -> None:
    from pgdispatch.worker.outbound.limits import Limits
    from pgdispatch.worker.outcome import Postpone

    with pytest.raises(ValueError):
        Limits(None, breaker_failures=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Limits(None, breaker_cooldown=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Postpone(-1, "x")


async def test_deadlines_time_out_like_asyncio_timeout_and_pass_other_cancellations() -> None:
    import asyncio

    from pgdispatch.worker.deadlines import Deadlines

    deadlines = Deadlines(resolution=0.01)
    with pytest.raises(TimeoutError):
        async with deadlines.after(0.05):
            await asyncio.sleep(5)
    async with deadlines.after(5):
        await asyncio.sleep(0.01)  # in time: nothing happens

    async def cancelled_from_outside() -> None:
        async with deadlines.after(5):
            await asyncio.sleep(5)

    task = asyncio.create_task(cancelled_from_outside())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert deadlines._ticker is None  # the ticker stops when nothing is due
