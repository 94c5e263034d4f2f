"""Total-time deadlines for many concurrent requests, checked by one ticker.

asyncio.timeout() schedules a timer per use; under uvloop each is a libuv handle allocated and
closed again, which cost ~8% of a delivery's CPU at thousands of requests per second. Here a
deadline is a dict entry, and one task wakes every `resolution` seconds to cancel the overdue.
Semantics follow asyncio.timeout: the overdue task is cancelled, and the cancellation surfaces
as TimeoutError at the `async with`, unless someone else cancelled the task too.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    def __init__(self, *, resolution: float = 0.25) -> None:
        self._resolution = resolution
        self._due: dict[asyncio.Task[object], float] = {}
        self._overdue: set[asyncio.Task[object]] = set()
        self._ticker: asyncio.Task[None] | None = None

    def after(self, seconds: float) -> _Deadline:
        return _Deadline(self, seconds)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            await asyncio.sleep(self._resolution)
            now = loop.time()
            for task, when in list(self._due.items()):
                if when <= now:
                    del self._due[task]
                    self._overdue.add(task)
                    task.cancel()
        self._ticker = None


class _Deadline:
    __slots__ = ("_deadlines", "_seconds", "_task")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self._deadlines = deadlines
        self._seconds = seconds
        self._task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "a deadline needs a running task"
        self._task = task
        owner = self._deadlines
        owner._due[task] = asyncio.get_running_loop().time() + self._seconds
        if owner._ticker is None:
            owner._ticker = asyncio.create_task(owner._tick())

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task = self._task
        assert task is not None
        owner = self._deadlines
        owner._due.pop(task, None)
        if task in owner._overdue:
            owner._overdue.discard(task)
            if exc_type is asyncio.CancelledError and task.uncancel() == 0:
                raise TimeoutError from exc
