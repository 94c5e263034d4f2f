"""download → extract → notify: one kind per stage, one queue per stage (seed 003's layout).

Each stage does its work and enqueues the next stage in one transaction of its own, with an
idempotency key, so a stage that runs twice (a worker killed after the commit, before its
outcome was written) still starts the next stage once."""

from __future__ import annotations

import asyncio

import pgdispatch

app = pgdispatch.App()


@app.executor("source.download", queue="source_download", timeout=30)
async def download(job: pgdispatch.Job) -> pgdispatch.Outcome:
    source_id = job.args.get("source_id")
    if not isinstance(source_id, int):
        raise pgdispatch.InvalidJob(f"source_id must be an integer, got {source_id!r}")
    async with job.connection() as conn:
        row = await (await conn.execute("SELECT url FROM sample.sources WHERE id = %s", (source_id,))).fetchone()
        if row is None:
            return pgdispatch.Discard("invalid", f"no source {source_id}")
        body = f"contents of {row[0]}"  # the sample's stand-in for fetching the URL
        await conn.execute("UPDATE sample.sources SET status = 'downloaded', body = %s WHERE id = %s",
                           (body, source_id))
        await app.enqueue(conn, "source.extract", {"source_id": source_id},
                          idempotency_key=f"extract:{source_id}")
    return pgdispatch.Done(detail={"bytes": len(body)})


@app.executor("source.extract", queue="source_extract")
async def extract(job: pgdispatch.Job) -> pgdispatch.Outcome:
    source_id = job.args["source_id"]
    async with job.connection() as conn:
        await conn.execute("UPDATE sample.sources SET status = 'extracted', words = "
                           "array_length(regexp_split_to_array(body, '\\s+'), 1) WHERE id = %s",
                           (source_id,))
        await app.enqueue(conn, "source.notify", {"source_id": source_id},
                          idempotency_key=f"notify:{source_id}")
    return pgdispatch.Done()


@app.executor("source.notify", queue="source_notify")
async def notify(job: pgdispatch.Job) -> None:  # returning nothing counts as Done
    source_id = job.args["source_id"]
    async with job.connection() as conn:
        await conn.execute("INSERT INTO sample.notifications (source_id, message) "
                           "SELECT id, format('%%s: %%s words', url, words) FROM sample.sources WHERE id = %s",
                           (source_id,))
        await conn.execute("UPDATE sample.sources SET status = 'notified' WHERE id = %s", (source_id,))


@app.executor("sample.flaky", max_attempts=5)
async def flaky(job: pgdispatch.Job) -> pgdispatch.Outcome:
    """Fails on its first two attempts, then succeeds; retried with no wait in between."""
    if job.attempt < 3:
        raise ConnectionError(f"the remote hung up (attempt {job.attempt})")
    return pgdispatch.Done(detail={"attempts": job.attempt})


@app.executor("sample.slow", timeout=0.2)
async def slow(job: pgdispatch.Job) -> pgdispatch.Outcome:
    await asyncio.sleep(float(job.args.get("seconds", 5)))
    return pgdispatch.Done()
