"""The chaos suite's mixed workload (tests/test_chaos_mixed.py): a 4-step process and a
per-second command, beside the built-in requests, leads and call events. Each step and each
command run appends a line to a file in $MIXED_LOG, outside the database, so the test can tell
what ran (and when) even across the database's own crashes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pgdispatch

app = pgdispatch.App()


def record(name: str, *parts: object) -> None:
    line = " ".join(str(p) for p in (f"{time.time():.6f}", *parts))
    with (Path(os.environ["MIXED_LOG"]) / name).open("a") as out:
        out.write(line + "\n")


@app.process("ship", "SHIP ORDER", version=1, max_attempts=50, backoff=0.2, step_timeout=30)
class Ship:
    steps = ["reserve", "charge", "pack", "notify"]

    async def _step(self, name: str, state: dict[str, Any]) -> pgdispatch.StepDone:
        record("steps", state["order"], name, os.getpid())
        await asyncio.sleep(0.05)  # long enough for a kill to land mid-step now and then
        return pgdispatch.StepDone(name, state={name: True})

    async def reserve(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return await self._step("reserve", state)

    async def charge(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return await self._step("charge", state)

    async def pack(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return await self._step("pack", state)

    async def notify(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return await self._step("notify", state)


@app.command("every-second", "Every Second", schedule="* * * * * *", lock=10)
async def every_second(job: pgdispatch.Job) -> None:
    record("ticks", job.args["tick"], os.getpid())
