"""Batcher: concurrent callers share one call; a bad request fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pgdispatch.worker.batcher import Batcher


class BadData(Exception):
    """A request the remote refuses: worth sending alone."""


class Lost(Exception):
    """The connection is gone: the whole batch fails."""


class Remote:
    """Stands in for the database: records each call's batch, squares numbers, refuses 13
    (bad data) and, while `down`, every call (a lost connection)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def call(self, batch: Sequence[int]) -> list[int]:
        self.calls.append(list(batch))
        await self.gate.wait()
        if self.down:
            raise Lost("connection lost")
        if 13 in batch:
            raise BadData("13 is refused")
        return [n * n for n in batch]


def batcher(remote: Remote, **options: int) -> Batcher[int, int]:
    return Batcher(remote.call, alone_after=lambda e: isinstance(e, BadData), **options)


async def test_callers_ready_together_share_one_call() -> None:
    remote = Remote()
    squares = batcher(remote)
    numbers = range(20, 120)
    assert await asyncio.gather(*(squares.ask(n) for n in numbers)) == [n * n for n in numbers]
    assert remote.calls == [list(numbers)]


async def test_callers_arriving_during_a_call_go_in_the_next_at_most_max_in_flight_at_once() -> None:
    remote = Remote()
    squares = batcher(remote, max_in_flight=1, max_batch=30)
    remote.gate.clear()
    first = asyncio.ensure_future(squares.ask(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert remote.calls == [[1]]
    rest = [asyncio.ensure_future(squares.ask(n)) for n in range(20, 90)]
    await asyncio.sleep(0)
    assert remote.calls == [[1]]  # one call in flight: the others wait for it
    remote.gate.set()
    assert await first == 1
    assert [await r for r in rest] == [n * n for n in range(20, 90)]
    assert [len(c) for c in remote.calls] == [1, 30, 30, 10]


async def test_a_refused_request_fails_alone_and_its_neighbours_get_their_answers() -> None:
    remote = Remote()
    squares = batcher(remote)
    answers = await asyncio.gather(*(squares.ask(n) for n in (12, 13, 14)), return_exceptions=True)
    assert answers[0] == 144 and answers[2] == 196
    assert isinstance(answers[1], BadData)
    assert remote.calls == [[12, 13, 14], [12], [13], [14]]


async def test_a_lost_connection_fails_the_batch_without_a_call_per_request() -> None:
    remote = Remote()
    squares = batcher(remote)
    remote.down = True
    answers = await asyncio.gather(*(squares.ask(n) for n in range(50)), return_exceptions=True)
    assert all(isinstance(a, Lost) for a in answers)
    assert len(remote.calls) == 1
    remote.down = False
    assert await squares.ask(3) == 9  # and the batcher goes on


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    remote = Remote()
    squares = batcher(remote)
    remote.gate.clear()
    tasks = [asyncio.ensure_future(squares.ask(n)) for n in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    tasks[1].cancel()
    remote.gate.set()
    assert await tasks[0] == 0 and await tasks[2] == 4
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
