"""The sample project's process type (seed 001): CREATE ORDER in three named steps."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pgdispatch

app = pgdispatch.App()


class NotifyCustomer:
    """A step as a task class (the seed's HandleTask2::class)."""

    async def __call__(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone(f"customer {state['customer']} notified",
                                   payload={"to": state["customer"], "api_key": "sk-DO-NOT-LEAK"})


@app.process("create_order", "CREATE ORDER", version=int(os.environ.get("SAMPLE_ORDER_VERSION", "1")),
             max_attempts=3, backoff=0)
class CreateOrder:
    steps = ["validate", "reserve", ("notify", NotifyCustomer)]

    async def validate(self, state: dict[str, Any]) -> pgdispatch.StepDone | pgdispatch.StepError:
        if not state.get("items"):
            return pgdispatch.StepError("an order needs items")
        return pgdispatch.StepDone("valid", state={"validated": True})

    async def reserve(self, state: dict[str, Any]) -> pgdispatch.StepDone | pgdispatch.StepRetry:
        await asyncio.sleep(float(state.get("slow", 0)))  # the chaos test kills the worker in here
        if state.get("stock_down") and not state.get("stock_back"):
            return pgdispatch.StepRetry("the stock service is down")
        return pgdispatch.StepDone(f"reserved {len(state['items'])} items", payload={"items": state["items"]},
                                   state={"reservation": "R-1"})
