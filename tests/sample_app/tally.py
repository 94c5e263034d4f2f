"""A three-step process many instances of which run at once (batched steps)."""

from __future__ import annotations

from typing import Any

import pgdispatch

app = pgdispatch.App(pool_size=4)


@app.process("tally", "TALLY", version=1, max_attempts=2, backoff=0)
class Tally:
    steps = ["count", "note", "close"]

    async def count(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone(state={"counted": state["n"] * 2})

    async def note(self, state: dict[str, Any]) -> pgdispatch.StepDone | pgdispatch.StepRetry:
        if state["n"] % 7 == 0:
            return pgdispatch.StepRetry("every seventh waits", after=0)
        # A NUL character: a state PostgreSQL refuses to store.
        return pgdispatch.StepDone(f"noted {state['n']}", state={"note": "a\x00b" if state.get("poison") else ""})

    async def close(self, state: dict[str, Any]) -> None:
        return None
