"""The sample project's periodic commands (seed 001's registerCommands), on an App of their own."""

from __future__ import annotations

import asyncio
import os

import pgdispatch

app = pgdispatch.App()


@app.command("tick-recorder", "Record Ticks", schedule="* * * * * *", args=["service1", "service2"])
async def record_tick(job: pgdispatch.Job) -> None:
    """Every second: which tick ran, in which process, with which arguments."""
    async with job.connection() as conn:
        await conn.execute("INSERT INTO sample.ticks (tick, pid, args) VALUES (%s, %s, %s)",
                           (job.args["tick"], os.getpid(), pgdispatch_args(job)))


@app.command("slow-import", "Import Cost Invoices to Books", schedule="0 3 * * *", args=[10, 24], lock=600)
async def slow_import(job: pgdispatch.Job) -> None:
    await asyncio.sleep(float(os.environ.get("SAMPLE_IMPORT_SECONDS", "60")))


def pgdispatch_args(job: pgdispatch.Job) -> str:
    return ",".join(str(a) for a in job.args["args"])
