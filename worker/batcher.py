"""Batcher: many concurrent callers, one database call.

Every caller awaits its own answer; the requests that arrive while a call is being made are
sent together in the next one (group commit). A burst of a few hundred jobs at the same point
then costs a few round trips instead of a few hundred, and a lone caller waits no longer than
one loop turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

# The database call: the answers in the order of the requests.
Call = Callable[[Sequence[Request]], Awaitable[Sequence[Answer]]]


class Batcher(Generic[Request, Answer]):
    """Sends what callers ask through `call`, at most `max_batch` requests at a time and at
    most `max_in_flight` calls at once. When a call fails for several requests and
    `alone_after(error)` says a request of its own may fare better (bad data rather than a lost
    connection), each is sent again on its own, so one bad request fails only its own caller."""

    def __init__(self, call: Call[Request, Answer], *, alone_after: Callable[[Exception], bool],
                 max_batch: int = 500, max_in_flight: int = 4, gather: float = 0.0) -> None:
        """`gather`: seconds a call waits for more requests before it is sent (0: one loop turn),
        for callers that can afford to wait a moment to share a round trip."""
        self._call = call
        self._alone_after = alone_after
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._gather = gather
        self._waiting: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def ask(self, request: Request) -> Answer:
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, answer))
        self._start()
        return await answer

    def _start(self) -> None:
        if self._waiting and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            # A task, so the batch is taken a loop turn later: callers ready in this turn join it.
            task = asyncio.get_running_loop().create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        if self._gather:
            await asyncio.sleep(self._gather)
        batch, self._waiting = self._waiting[:self._max_batch], self._waiting[self._max_batch:]
        try:
            try:
                await self._answer(batch)
            except Exception as exc:
                if len(batch) == 1 or not self._alone_after(exc):
                    raise
                for one in batch:
                    try:
                        await self._answer([one])
                    except Exception as alone:
                        _fail([one], alone)
        except Exception as exc:
            _fail(batch, exc)
        except BaseException:
            for _, answer in batch:
                answer.cancel()
            raise
        finally:
            self._in_flight -= 1
            self._start()

    async def _answer(self, batch: list[tuple[Request, asyncio.Future[Answer]]]) -> None:
        if not batch:
            return
        answers = await self._call([request for request, _ in batch])
        if len(answers) != len(batch):
            raise RuntimeError(f"a batch of {len(batch)} requests got {len(answers)} answers")
        for (_, answer), value in zip(batch, answers, strict=True):
            if not answer.done():  # done: its caller was cancelled meanwhile (a job's timeout)
                answer.set_result(value)


def _fail(batch: Sequence[tuple[object, asyncio.Future[Answer]]], error: Exception) -> None:
    for _, answer in batch:
        if not answer.done():
            answer.set_exception(error)
