"""The App the processes scenario runs: a process of five no-op steps."""

from __future__ import annotations

from typing import Any

import pgdispatch

app = pgdispatch.App(pool_size=20)


@app.process("bench_noop", "BENCH NO-OP", version=1)
class NoOp:
    steps = ["one", "two", "three", "four", "five"]

    async def one(self, state: dict[str, Any]) -> None:
        return None

    two = three = four = five = one
