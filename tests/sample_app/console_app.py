"""The sample project the console's browser tests run in real worker processes: a process whose
payment step fails until the test lets it through (the file $CHECKOUT_PAYMENTS_UP exists), and a
command that is not due during a test."""

from __future__ import annotations

import os
from typing import Any

import pgdispatch

app = pgdispatch.App()


@app.process("checkout", "CHECKOUT", version=1, max_attempts=1, backoff=0)
class Checkout:
    steps = ["reserve", "charge", "ship"]

    async def reserve(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone("reserved", state={"reservation": "R-1"})

    async def charge(self, state: dict[str, Any]) -> pgdispatch.StepDone | pgdispatch.StepError:
        if not os.path.exists(os.environ.get("CHECKOUT_PAYMENTS_UP", "/nonexistent")):  # noqa: ASYNC240
            return pgdispatch.StepError("the payment provider declined: 402")
        return pgdispatch.StepDone("charged", payload={"amount": 42})

    async def ship(self, state: dict[str, Any]) -> pgdispatch.StepDone:
        return pgdispatch.StepDone("shipped")


@app.command("monthly-report", "Monthly report", schedule="0 4 1 * *")
async def monthly_report(job: pgdispatch.Job) -> None:
    """Due on the first of the month at 04:00: Idle through the tests."""
